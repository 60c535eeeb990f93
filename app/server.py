"""The app's server: Streamlit's `st.App` over the page (`main.py`) plus one route that serves the
maps' pictures by URL (`images.py`). `chipscout app` runs `streamlit run` on this file, which
Streamlit recognises as an ASGI app and serves with uvicorn; the page itself is `main.py`."""

from pathlib import Path

import streamlit as st

from chipscout.app import images

app = st.App(Path(__file__).resolve().with_name("main.py"), routes=images.serve())
