"""`chipscout refit`: a new transform fitted on a table's raw vectors, written into a new table
in one commit; the source is never changed, and bad requests leave nothing behind."""

import json
from datetime import datetime, timezone

import numpy as np
import pytest
from typer.testing import CliRunner

from chipscout.indexer.chips import ChipGrid
from chipscout.indexer.cli.commands import app
from chipscout.indexer.ingest.embedding import Embedder
from chipscout.indexer.errors import ChipscoutError, StoreError
from chipscout.indexer.sources.files import local_source
from chipscout.indexer.ingest import index_sources
from chipscout.indexer.ingest.reading import ChipReader, sample_chips
from chipscout.indexer.ingest.refit import RAW_COLUMN, refit_table
from chipscout.indexer.search import SearchEngine
from chipscout.indexer.store import ChipStore
from chipscout.indexer.ingest.transform import SMALL_SAMPLE_TRANSFORM, VectorTransform, default_transform_spec

from tests.conftest import DATES, TINY_RCF, build_index

SPEC = "standardize,pca-whiten:8:0.1,l2"


@pytest.fixture()
def source_db(small_cog, tmp_path):
    db = str(tmp_path / "db")
    build_index(db, small_cog)  # 98 chips, the family's default transform, raw vectors kept
    return db


def _columns(store: ChipStore, *names: str):
    rows = store.scan(["chip_id", *names]).sort_by("chip_id")
    return rows["chip_id"].to_pylist(), {n: np.array(rows[n].to_pylist(), dtype=np.float64) for n in names}


def test_refit_writes_every_chip_with_vectors_of_the_new_transform(source_db):
    source = ChipStore(source_db, "chips")
    version, spec_before = source.version, source.config.transform["spec"]
    ids, before = _columns(source, "vector", RAW_COLUMN)

    report = refit_table(source_db, "chips", "chips_refit", SPEC, sample=None)

    assert (report.rows, report.fit_vectors, report.output_dim, report.spec) == (98, 98, 8, SPEC)
    assert report.previous_spec == spec_before
    target = ChipStore(source_db, "chips_refit")
    assert target.config.transform["spec"] == SPEC and target.config.embedding_dim == 8
    assert target.config.encoder_dim == source.config.encoder_dim
    target_ids, after = _columns(target, "vector", RAW_COLUMN)
    assert target_ids == ids
    np.testing.assert_array_equal(after[RAW_COLUMN], before[RAW_COLUMN])
    expected = VectorTransform(SPEC).fit(before[RAW_COLUMN]).apply(before[RAW_COLUMN].astype(np.float32))
    np.testing.assert_allclose(after["vector"], expected, atol=1e-5)
    # The source is untouched: same version, same vectors.
    source = ChipStore(source_db, "chips")
    assert source.version == version and source.config.transform["spec"] == spec_before
    np.testing.assert_array_equal(_columns(source, "vector")[1]["vector"], before["vector"])
    # Metadata columns came across unchanged.
    assert (target.scan(["chip_id", "acquired", "source_id", "footprint"]).sort_by("chip_id")
            == source.scan(["chip_id", "acquired", "source_id", "footprint"]).sort_by("chip_id"))


def test_a_refitted_table_embeds_queries_with_its_new_transform(source_db, small_cog):
    """A chip re-read and re-embedded for the new table gives its stored vector there, and the
    same neighbours as a search by its id."""
    refit_table(source_db, "chips", "chips_refit", SPEC)
    store = ChipStore(source_db, "chips_refit")
    embedder = Embedder.for_store(store)
    assert embedder.transform.spec == SPEC
    source = local_source(small_cog, sensor="sentinel-2-l2a", acquired=DATES["june"], source_id="cut-june")
    chip = sample_chips([source], ChipReader(list(store.config.bands), ChipGrid(64, 32), 0.5, None), 1)[0]
    vector = embedder.embed([chip], 10.0)[0]
    _, stored = store.vectors([chip.chip_id])
    np.testing.assert_allclose(vector, stored[0], atol=1e-5)
    search = SearchEngine(source_db, "chips_refit")
    for expand in (0, None):  # plain, and the table's default query expansion
        by_id = [round(h.similarity, 4) for h in search.similar_to_chip(chip.chip_id, k=5, expand=expand).results]
        by_vector = [round(h.similarity, 4) for h in search.similar_to_vector(
            vector, k=5, exclude_ids=[chip.chip_id], expand=expand).results]
        assert by_id == by_vector and len(by_id) == 5


def test_appends_to_a_refitted_table_reuse_its_transform(source_db, small_cog):
    refit_table(source_db, "chips", "chips_refit", SPEC)
    later = local_source(small_cog, sensor="sentinel-2-l2a", acquired=datetime(2024, 11, 2, 10, tzinfo=timezone.utc), source_id="cut-nov")
    summary = index_sources([later], db_uri=source_db, table_name="chips_refit", encoder=TINY_RCF,
                            grid=ChipGrid(64, 32), bands=["blue", "green", "red", "nir"], progress=False)
    assert summary.chips_new == 49
    store = ChipStore(source_db, "chips_refit")
    assert store.count() == 147 and store.config.transform["spec"] == SPEC
    ids, columns = _columns(store, "vector", RAW_COLUMN)
    transform = Embedder.for_store(store).transform
    np.testing.assert_allclose(columns["vector"], transform.apply(columns[RAW_COLUMN].astype(np.float32)),
                               atol=1e-5)


def test_the_default_spec_is_the_family_default_and_a_sample_is_seeded(source_db):
    first = refit_table(source_db, "chips", "a", "default", sample=80, seed=3)
    refit_table(source_db, "chips", "b", "default", sample=80, seed=3)
    family = VectorTransform(default_transform_spec("rcf"))
    expected = family.spec if 80 >= family.min_vectors(64) else VectorTransform(SMALL_SAMPLE_TRANSFORM).spec
    assert first.spec == expected
    assert first.fit_vectors == 80
    va = _columns(ChipStore(source_db, "a"), "vector")[1]["vector"]
    vb = _columns(ChipStore(source_db, "b"), "vector")[1]["vector"]
    np.testing.assert_array_equal(va, vb)


def test_a_refit_that_fails_while_writing_leaves_no_table(source_db):
    def fail_after_first_batch(written):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        refit_table(source_db, "chips", "half", SPEC, progress=fail_after_first_batch)
    assert not ChipStore(source_db, "half").exists()  # its files were never committed
    # The name is free again: a second refit succeeds.
    assert refit_table(source_db, "chips", "half", SPEC).rows == 98


@pytest.mark.parametrize("target, spec, sample, message", [
    ("chips", SPEC, None, "other than the source"),
    ("t2", "standardize,pca-whiten:500,l2", None, "asks for 500 dimensions"),
    ("t2", "standardize,pca-whiten:60,l2", 20, "needs at least 61 vectors"),
    ("t2", "standardize,wobble,l2", None, "wobble"),
    ("t2", "none", None, "needs no refit"),
    ("t2", SPEC, 1, "at least 2"),
])
def test_bad_refits_are_refused_and_write_nothing(source_db, target, spec, sample, message):
    version = ChipStore(source_db, "chips").version
    with pytest.raises((ChipscoutError, ValueError), match=message):
        refit_table(source_db, "chips", target, spec, sample=sample)
    assert ChipStore(source_db, "chips").version == version
    assert not ChipStore(source_db, "t2").exists()


def test_refit_refuses_an_existing_target_and_tables_without_raw_vectors(source_db, small_cog):
    refit_table(source_db, "chips", "taken", SPEC)
    with pytest.raises(StoreError, match="already exists"):
        refit_table(source_db, "chips", "taken", SPEC)
    plain = [local_source(small_cog, sensor="sentinel-2-l2a", acquired=DATES["june"], source_id="p")]
    index_sources(plain, db_uri=source_db, table_name="plain", encoder=TINY_RCF, grid=ChipGrid(64, 32),
                  bands=["blue", "green", "red", "nir"], transform="none", progress=False)
    assert RAW_COLUMN not in ChipStore(source_db, "plain").schema.names
    with pytest.raises(ChipscoutError, match="no fitted transform"):
        refit_table(source_db, "plain", "plain2", SPEC)


def test_cli_refit(source_db):
    runner = CliRunner()
    result = runner.invoke(app, ["refit", "--db", source_db, "--table", "chips", "--into", "cli_refit",
                                 "--transform", SPEC, "--sample", "0", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rows"] == 98 and report["spec"] == SPEC and report["target"] == "cli_refit"
    again = runner.invoke(app, ["refit", "--db", source_db, "--table", "chips", "--into", "cli_refit"])
    assert again.exit_code != 0 and "already exists" in str(again.exception)
