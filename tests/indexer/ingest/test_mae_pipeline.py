"""The MAE (Clay-compatible) encoder through the whole path: index -> store -> search."""

import numpy as np
import pytest
import torch

from chipscout.encoders.base import build_encoder
from chipscout.indexer.chips import ChipGrid
from chipscout.indexer.ingest.embedding import Embedder
from chipscout.indexer.errors import IncompatibleTableError
from chipscout.indexer.sources.files import local_source
from chipscout.indexer.ingest import EncoderChoice, index_sources
from chipscout.indexer.search import SearchEngine
from chipscout.indexer.store import ChipStore

BANDS = ["blue", "green", "red", "nir"]


def _index(db, small_cog, pooling="cls", checkpoint=None, table="mae"):
    params = {"pooling": pooling}
    if checkpoint:
        params["checkpoint"] = str(checkpoint)
    source = local_source(small_cog, sensor="sentinel-2-l2a", source_id="cut")
    return index_sources([source], db_uri=str(db), table_name=table,
                         encoder=EncoderChoice("clay-tiny", params), grid=ChipGrid(64, 64),
                         bands=BANDS, progress=False)


@pytest.fixture()
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder("clay-tiny")
    state = {f"model.encoder.{k}": v for k, v in encoder.encoder.state_dict().items()}
    state["model.decoder.head.weight"] = torch.zeros(2, 2)  # ignored, as in real checkpoints
    path = tmp_path / "clay-tiny.ckpt"
    torch.save({"state_dict": state, "epoch": 1}, path)
    return path


def test_mae_index_and_search_end_to_end(tmp_path, small_cog):
    summary = _index(tmp_path / "db", small_cog)
    assert summary.chips_new == 16 and summary.encoder == "clay-tiny/cls"
    store = ChipStore(str(tmp_path / "db"), "mae")
    assert store.config.normalization.kind == "standardize"
    assert store.config.embedding_dim == 64
    engine = SearchEngine(str(tmp_path / "db"), "mae")
    response = engine.similar_to_chip("cut_r000064_c000064_s64", k=5)
    assert len(response.results) == 5
    assert "cut_r000064_c000064_s64" not in {r.chip.chip_id for r in response.results}


def test_patch_pooling_keeps_patch_vectors(tmp_path, small_cog):
    _index(tmp_path / "db", small_cog, pooling="patch")
    store = ChipStore(str(tmp_path / "db"), "mae")
    patches = store.patch_vectors("cut_r000000_c000064_s64")
    assert patches.num_rows == 64  # an 8 x 8 grid of 8 px patches
    assert sorted(set(patches["patch_row"].to_pylist())) == list(range(8))
    vectors = np.stack(patches["vector"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_other_pooling_is_refused(tmp_path, small_cog):
    _index(tmp_path / "db", small_cog, pooling="cls")
    with pytest.raises(IncompatibleTableError, match="pooling"):
        _index(tmp_path / "db", small_cog, pooling="mean")


def test_checkpoint_tables_keep_a_digest_not_the_weights(tmp_path, small_cog, tiny_checkpoint):
    _index(tmp_path / "db", small_cog, checkpoint=tiny_checkpoint)
    store = ChipStore(str(tmp_path / "db"), "mae")
    assert store.fitted_state("encoder") is None and len(store.config.state_sha256) == 64
    embedder = Embedder.for_store(store, "cpu")
    stored = np.asarray(store.fetch(["cut_r000000_c000000_s64"], ["vector"])["vector"][0].as_py())
    assert embedder.encoder.embedding_dim == stored.shape[0]

    moved = tmp_path / "moved.ckpt"
    tiny_checkpoint.rename(moved)
    with pytest.raises(IncompatibleTableError, match="cannot rebuild"):
        Embedder.for_store(store, "cpu")
    assert Embedder.for_store(store, "cpu", checkpoint=str(moved)) is not None

    torch.manual_seed(1)
    other = build_encoder("clay-tiny")
    torch.save({"state_dict": {f"model.encoder.{k}": v for k, v in other.encoder.state_dict().items()}},
               tmp_path / "other.ckpt")
    with pytest.raises(IncompatibleTableError, match="not the ones"):
        Embedder.for_store(store, "cpu", checkpoint=str(tmp_path / "other.ckpt"))
