"""Metrics, reports and export, and the pure analysis that the explorer's pages show."""
