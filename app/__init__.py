"""chipscout's Streamlit front end (a thin layer over the `chipscout.indexer.search` and `chipscout.indexer.seedsets` facades)."""
