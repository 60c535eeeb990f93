"""Small real indexes built once per session from the cut of the demo scene."""

from datetime import datetime, timezone

import pytest

from indexer.chips import ChipGrid
from indexer.files import local_source
from indexer.pipeline import EncoderChoice, index_sources

TINY_RCF = EncoderChoice("rcf", {"kernels": "gaussian", "features": 64, "seed": 0})
DATES = {"june": datetime(2024, 6, 15, tzinfo=timezone.utc),
         "sept": datetime(2024, 9, 20, tzinfo=timezone.utc)}


def build_index(db_uri, small_cog, table="chips", grid=ChipGrid(64, 32)):
    """Two dated copies of the 4-band cut: 2 x 49 overlapping 64 px chips."""
    sources = [local_source(small_cog, sensor="sentinel-2-l2a", acquired=when, source_id=f"cut-{name}")
               for name, when in DATES.items()]
    return index_sources(sources, db_uri=str(db_uri), table_name=table, encoder=TINY_RCF, grid=grid,
                         bands=["blue", "green", "red", "nir"], progress=False)


@pytest.fixture(scope="session")
def indexed_db(small_cog, tmp_path_factory):
    db = tmp_path_factory.mktemp("indexed") / "db"
    summary = build_index(db, small_cog)
    assert summary.chips_new == 98, summary
    return str(db)
