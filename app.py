"""The ImageNet-O explorer: `streamlit run app.py`.

One sidebar picks the benchmark and architecture (kept in the URL and across pages); the
pages in pages/ are thin views run through this app's navigation. With no cache at all the
offline demo benchmark is built first. Set OODCORE_READONLY=1 for a public deployment.
"""

from pathlib import Path

from oodcore.explorer.shell import run_app

run_app(Path(__file__).parent / "pages")
