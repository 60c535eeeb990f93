"""The warm read path (`chipscout.indexer.search.warm`): one read of the table version per query,
and the sketch scan's answers checked against a plain reference scan."""

from dataclasses import replace

import numpy as np
import pytest
from lancedb.table import LanceTable

from chipscout.indexer.search import SearchEngine
from tests.indexer.grouped_tables import GROUPS, POLICY, _grouped_vectors, _rows, _truth, _write

SKETCH_POLICY = replace(POLICY, sketch_min_rows=1000, sketch_candidates=40)


@pytest.fixture
def version_reads(monkeypatch):
    """Counts reads of a LanceDB table's version (each a round trip to LanceDB's event loop)."""
    reads = []
    read = LanceTable.version.fget
    monkeypatch.setattr(LanceTable, "version", property(lambda table: reads.append(1) or read(table)))
    return reads


def test_a_warm_query_reads_the_table_version_once_and_never_a_stale_one_after_refresh(tmp_path, version_reads):
    db = str(tmp_path / "db")
    centres, vectors = _grouped_vectors(seed=5)
    rows = _rows(vectors, seed=5)
    store = _write(db, "growing", rows.slice(0, 2000))
    engine = SearchEngine(db, "growing", index_policy=SKETCH_POLICY)
    engine.warm_up()
    engine.similar_to_vector(centres[0], k=10)  # the table state of this version, built once
    for expand in (0, 3):  # query expansion searches twice, on the version read once
        version_reads.clear()
        response = engine.similar_to_vector(centres[1], k=10, expand=expand)
        assert response.method.startswith("sketch") and len(version_reads) == 1
    late_group = GROUPS - 1  # its rows arrive in the second write
    store.upsert(rows.slice(2000))
    engine.refresh()
    response = engine.similar_to_vector(centres[late_group], k=10)
    assert response.table_version == store.version
    assert [r.chip.chip_id for r in response.results] == _truth(vectors, rows, centres[late_group], 10)
