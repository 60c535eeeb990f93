"""chipscout's Streamlit front end (a thin layer over `indexer.search`)."""
