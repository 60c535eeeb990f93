"""chipscout: similarity search for satellite imagery.

The notebook API, in the spirit of lancedb's `connect -> open_table -> search`::

    import chipscout
    db = chipscout.connect("path/to/db")
    table = db.open_table("chips")
    results = table.search("CHIP_ID", k=10, filters=chipscout.Filters(date_from="2024-06-01", max_cloud=0.2))
    results.to_arrow()          # or .to_geodataframe() with geopandas installed

The parts behind it are `chipscout.indexer` (sources, ingest, store, search, seed sets,
evaluation, CLI), `chipscout.encoders` (plain torch modules) and `chipscout.app` (docs/architecture.md).
Importing this package loads neither torch nor LanceDB; they load with the first table opened.
"""

from chipscout._database import Database, Table, connect
from chipscout._filters import Filters
from chipscout._results import Results
from chipscout.indexer import __version__
from chipscout.indexer.errors import ChipscoutError, ExportError, LabelError, QueryError, StoreError

__all__ = [
    "ChipscoutError", "Database", "ExportError", "Filters", "LabelError", "QueryError", "Results",
    "StoreError", "Table", "__version__", "connect",
]
