"""A small real index for the app: the 98-chip table from two dated copies of the demo cut, plus an
empty table and one without thumbnails (tests may touch LanceDB directly; the app never does)."""

import lancedb
import pytest

from indexer.chips import ChipGrid
from tests.indexer.conftest import build_index


@pytest.fixture(scope="session")
def app_db(small_cog, tmp_path_factory) -> str:
    db = tmp_path_factory.mktemp("app") / "db"
    assert build_index(db, small_cog, table="chips").chips_new == 98
    for table in ("empty", "plain"):
        assert build_index(db, small_cog, table=table, grid=ChipGrid(128, 128)).chips_new == 8
    connection = lancedb.connect(str(db))
    connection.open_table("empty").delete("true")
    connection.open_table("plain").update(values_sql={"thumbnail": "NULL"})
    return str(db)


@pytest.fixture(autouse=True)
def _restore_main_module():
    """AppTest installs the page script as `sys.modules["__main__"]` and leaves it there; later
    tests that spawn processes (Dask workers) would then re-run the page in every child."""
    import sys

    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main
