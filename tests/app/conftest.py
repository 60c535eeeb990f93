"""A small real index for the app: the 98-chip table from two dated copies of the demo cut, plus an
empty table and one without thumbnails (tests may touch LanceDB directly; the app never does)."""

from pathlib import Path

import lancedb
import pytest
from streamlit.testing.v1 import AppTest

from chipscout.indexer.chips import ChipGrid
from chipscout.indexer.search import SearchEngine
from tests.conftest import build_index

APP = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


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


@pytest.fixture
def open_app(app_db, monkeypatch):
    """Opens the app on table `chips` with query parameters; no exception allowed."""
    monkeypatch.setenv("CHIPSCOUT_DB", app_db)
    monkeypatch.delenv("CHIPSCOUT_BASEMAP_URL", raising=False)

    def open_page(**params) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=60)
        at.query_params.update({"table": "chips", **params})
        at.run()
        assert not at.exception, at.exception
        return at

    return open_page


@pytest.fixture(scope="module")
def engine(app_db):
    return SearchEngine(app_db, "chips")
