"""The Streamlit explorer's shared code (settings, cached reads, sidebar, widgets, charts). It imports the engine; the engine never imports it."""
