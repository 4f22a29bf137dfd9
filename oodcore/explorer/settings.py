"""The explorer's settings: titles, colours, limits and read-only mode."""

from __future__ import annotations

import os

APP_TITLE = "ImageNet-O explorer"

READONLY_ENV = "OODCORE_READONLY"

ID_COLOR = "#3574C4"  # in-distribution: blue everywhere

OOD_COLOR = "#E4572E"  # out-of-distribution: orange-red everywhere

CONVENTIONS = (
    "**OOD is the positive class; a higher score means more OOD.** "
    "FPR@95 (OOD+): ID false-positive rate when 95% of OOD are caught. "
    "FPR@95 (ID+): OOD acceptance when 95% of ID are kept."
)

MAX_UPLOAD_MB = 20

MAX_PIXELS = 40_000_000  # uploads above this (from the header, before decoding) are rejected as bombs


def readonly() -> bool:
    """Public deployments: `OODCORE_READONLY=1` (or `[oodcore] readonly = true` in secrets.toml)."""
    value = os.environ.get(READONLY_ENV, "")
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        import streamlit as st

        if st.secrets.load_if_toml_exists():
            section = st.secrets.get("oodcore", {}) or {}
            return bool(section.get("readonly", False))
    except Exception:  # no secrets file, or outside a Streamlit run
        pass
    return False
