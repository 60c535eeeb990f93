"""The LanceDB chip table: schema, recorded configuration, state, idempotence, refusals."""

import json

import numpy as np
import pyarrow as pa
import pytest
import shapely

from chipscout.indexer.chips import ChipGrid
from chipscout.indexer.ingest.embedding import Embedder
from chipscout.indexer.errors import IncompatibleTableError, StoreError
from chipscout.indexer.sources.files import local_source
from chipscout.indexer.ingest import EncoderChoice, index_sources
from chipscout.indexer.store import ChipStore, sql_literal

from tests.conftest import TINY_RCF, build_index


def test_table_records_how_vectors_were_made(indexed_db):
    store = ChipStore(indexed_db, "chips")
    config = store.config
    assert config.encoder == "rcf" and config.encoder_label == "rcf-gaussian"
    assert config.encoder_config["features"] == 64 and config.embedding_dim == 64
    assert config.bands == ("blue", "green", "red", "nir")
    assert config.band_wavelengths_um == (0.493, 0.56, 0.665, 0.842)
    assert config.normalization.kind == "reflectance"
    assert config.chipscout_version and config.created_at and len(config.state_sha256) == 64
    schema = store.schema
    assert schema.field("vector").type == pa.list_(pa.float32(), 64)
    assert schema.field("footprint").metadata[b"ARROW:extension:name"] == b"geoarrow.wkb"


def test_rows_hold_footprints_quality_and_thumbnails(indexed_db):
    rows = ChipStore(indexed_db, "chips").scan()
    assert rows.num_rows == 98 and len(set(rows["chip_id"].to_pylist())) == 98
    vectors = np.stack(rows["vector"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    footprints = shapely.from_wkb(rows["footprint"].to_pylist())
    assert all(f.is_valid and f.area > 0 for f in footprints)
    first = rows.slice(0, 1).to_pylist()[0]
    assert first["min_lon"] == pytest.approx(footprints[0].bounds[0])
    assert -75.7 < first["center_lon"] < -75.6 and 37.6 < first["center_lat"] < 37.7
    assert first["crs"] == "EPSG:32618" and first["size_px"] == 64 and first["gsd_m"] == 10.0
    assert first["nodata_fraction"] == 0.0 and first["cloud_fraction"] is None
    assert first["thumbnail"][:8] == b"\x89PNG\r\n\x1a\n"
    assert first["acquired"].year == 2024


def test_stored_encoder_reproduces_stored_vectors(indexed_db, small_cog):
    store = ChipStore(indexed_db, "chips")
    embedder = Embedder.for_store(store, "cpu")
    from chipscout.indexer.ingest.reading import ChipReader

    reader_setup = ChipReader(list(store.config.bands), ChipGrid(64, 32), 1.0, None)
    source = local_source(small_cog, sensor="sentinel-2-l2a", source_id="cut-june")
    reader, projector, selected = reader_setup.open(source)
    with reader:
        chip = reader_setup.read(reader, projector, selected, 32, 64)
    fresh = embedder.embed([chip], gsd_m=10.0)[0]
    stored = np.asarray(store.fetch([chip.chip_id], ["vector"])["vector"][0].as_py())
    # CPU convolution kernels differ between a batch of 1 and of 32 in the last float bits.
    np.testing.assert_allclose(fresh, stored.astype(np.float32), atol=1e-6)


def test_reindexing_adds_no_duplicates(tmp_path, small_cog):
    first = build_index(tmp_path / "db", small_cog)
    version = ChipStore(str(tmp_path / "db"), "chips").version
    again = build_index(tmp_path / "db", small_cog)
    assert first.chips_new == 98
    assert again.chips_new == 0 and again.chips_present == 98 and again.table_rows == 98
    assert ChipStore(str(tmp_path / "db"), "chips").version == version  # nothing rewritten


def test_other_encoder_is_refused_and_table_untouched(tmp_path, small_cog):
    build_index(tmp_path / "db", small_cog)
    store = ChipStore(str(tmp_path / "db"), "chips")
    before = (store.version, store.count())
    source = local_source(small_cog, sensor="sentinel-2-l2a", source_id="other")
    for encoder, bands in [
        (EncoderChoice("rcf", {"kernels": "gaussian", "features": 128, "seed": 0}), None),
        (EncoderChoice("rcf", {"kernels": "gaussian", "features": 64, "seed": 1}), None),
        (TINY_RCF, ["blue", "green", "red"]),
    ]:
        with pytest.raises(IncompatibleTableError, match="chips"):
            index_sources([source], db_uri=str(tmp_path / "db"), table_name="chips", encoder=encoder,
                          grid=ChipGrid(64, 32), bands=bands, progress=False)
    store = ChipStore(str(tmp_path / "db"), "chips")
    assert (store.version, store.count()) == before


def test_missing_table_lists_what_exists(indexed_db):
    with pytest.raises(StoreError, match=r"no table 'nope'.*tables there: chips"):
        ChipStore(indexed_db, "nope").config


@pytest.mark.parametrize("name", ["", "a b", "../x", "x__state", "-lead", "t;drop"])
def test_bad_table_names_are_refused(tmp_path, name):
    with pytest.raises(StoreError, match="bad table name"):
        ChipStore(str(tmp_path), name)


def test_sql_literals_quote_and_type_check():
    assert sql_literal("x' OR 1=1 --") == "'x'' OR 1=1 --'"
    assert sql_literal(0.25) == "0.25" and sql_literal(3) == "3"
    for bad in [float("nan"), float("inf"), object(), "a\x00b"]:
        with pytest.raises(Exception):
            sql_literal(bad)


def test_config_survives_json_round_trip(indexed_db):
    config = ChipStore(indexed_db, "chips").config
    assert type(config).from_json(config.to_json()) == config
    assert json.loads(config.to_json())["encoder_config"]["kernels"] == "gaussian"


def test_a_table_created_meanwhile_is_written_into_only_when_its_fit_is_this_runs(tmp_path):
    """Two runs both saw no table: the later `create` writes into the first one's table when its
    encoder state and transform are the same, and otherwise fails leaving the first's state."""
    from chipscout.indexer.ingest.fitted_state import encode_state
    import torch
    from tests.synthetic import synthetic_config

    db = str(tmp_path / "db")
    first, same, other = ChipStore(db, "chips"), ChipStore(db, "chips"), ChipStore(db, "chips")
    assert not first.exists() and not same.exists() and not other.exists()
    kernels = encode_state({"weight": torch.ones(3)})
    first.create(synthetic_config(8), kernels, states={"transform": encode_state({"mean": torch.zeros(8)})})

    same.create(synthetic_config(8), kernels, states={"transform": encode_state({"mean": torch.zeros(8)})})
    assert same.exists() and same.version == first.version

    with pytest.raises(IncompatibleTableError, match="created by another run while this one was fitting"):
        other.create(synthetic_config(8), encode_state({"weight": torch.zeros(3)}),
                     states={"transform": encode_state({"mean": torch.ones(8)})})
    check = ChipStore(db, "chips")
    assert check.config.state_sha256 == kernels.sha256
    assert check.fitted_state("encoder").sha256 == kernels.sha256
    assert check.fitted_state("transform").sha256 == encode_state({"mean": torch.zeros(8)}).sha256


def test_a_state_table_another_writer_created_meanwhile_is_used(tmp_path, monkeypatch):
    """Two writers on an object store both see no `<table>__state` and both create it: the later
    create fails in LanceDB ("already exists"); the store then uses the one the other created."""
    from chipscout.indexer.store.chip_store import FittedState

    first, second = ChipStore(str(tmp_path / "db"), "chips"), ChipStore(str(tmp_path / "db"), "chips")
    first.put_fitted_state("encoder", FittedState(b"one", "sha-one"))
    looked = []
    real = ChipStore._open_if_committed

    def not_yet(self, name):  # the second writer looked before the first created it
        looked.append(name)
        return None if len(looked) == 1 else real(self, name)

    monkeypatch.setattr(ChipStore, "_open_if_committed", not_yet)
    second.put_fitted_state("transform", FittedState(b"two", "sha-two"))
    monkeypatch.undo()
    assert len(looked) == 2  # the create failed and the table was opened instead
    assert first.fitted_state("encoder").blob == b"one" and first.fitted_state("transform").blob == b"two"


def test_new_tables_are_written_in_the_lance_format_that_takes_rows_fast(tmp_path):
    """Chip tables are Lance 2.1 (`TABLE_FORMAT`: its takes of result rows were 2.5x faster than
    2.2's), whichever way they are created or appended to: `create` + upsert, fragments written
    and committed by cluster workers, and `create_with_rows` (refit)."""
    from chipscout.indexer.store.chip_store import TABLE_FORMAT
    from tests.synthetic import write_table

    def formats(store):
        dataset = store._table.to_lance()
        files = {(f.file_major_version, f.file_minor_version)
                 for fragment in dataset.get_fragments() for f in fragment.data_files()}
        return dataset.data_storage_version, files

    wanted = TABLE_FORMAT["new_table_data_storage_version"]
    major, minor = (int(p) for p in wanted.split("."))
    rng = np.random.default_rng(0)
    store = write_table(str(tmp_path / "db"), "chips", [f"c{i}" for i in range(4)],
                        rng.standard_normal((4, 8)), [(i, 0.0) for i in range(4)])
    rows = store.scan().slice(0, 2)
    rows = rows.set_column(0, "chip_id", pa.array(["d0", "d1"]))
    store.commit_fragments(store.write_fragments(rows), store.version)
    assert store.count() == 6
    assert formats(store) == (wanted, {(major, minor)})

    copy = ChipStore(str(tmp_path / "db"), "copy")
    copy.create_with_rows(store.config, iter(store.scan().to_batches()), None)
    assert copy.count() == 6 and formats(copy) == (wanted, {(major, minor)})
