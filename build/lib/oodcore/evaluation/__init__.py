"""Metrics, reports and the pure analysis that the explorer's pages show."""
