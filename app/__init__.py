"""chipscout's Streamlit front end (a thin layer over `chipscout.indexer.search.engine`)."""
