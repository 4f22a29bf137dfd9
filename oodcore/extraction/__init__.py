"""Passes of a network over image folders: chunked extraction, the ODIN grid, the study runner, the demo."""
