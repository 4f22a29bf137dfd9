"""The command line (`oodcore ...` / `python -m oodcore ...`) and the benchmark."""
