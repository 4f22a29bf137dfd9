"""Training runs: configuration, tasks, job files, the job loop, energy fine-tuning and flows."""
