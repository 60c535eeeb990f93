"""chipscout: similarity search for satellite imagery.

The notebook facade lives here; the parts are `chipscout.indexer` (sources, ingest, store, search,
seed sets, evaluation, CLI), `chipscout.encoders` (plain torch modules) and `chipscout.app`.
"""

from chipscout.indexer import __version__

__all__ = ["__version__"]
