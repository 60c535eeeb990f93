"""chipscout indexer: sources -> chips -> encoder -> LanceDB store -> search API."""

__version__ = "0.1.0"
