"""The ImageNet-O explorer: `streamlit run app.py`.

One sidebar picks the benchmark and architecture (kept in the URL and across pages);
each page in pages/ also runs on its own (`streamlit run pages/odin_tuner.py`).
With no cache at all the offline demo benchmark is built first.
Set OODCORE_READONLY=1 for a public deployment (no builds, no work pages).
"""

from oodcore import ui

ui.run_app()
