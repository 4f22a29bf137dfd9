"""Sharing a study: the compact read-only bundle (format and reader), the deployable share folder, the static report."""
