"""Vector transforms: fitting, recording with a table, and identical index/query application."""

import numpy as np
import pytest

from chipscout.indexer.chips import ChipGrid
from chipscout.indexer.ingest.embedding import Embedder
from chipscout.indexer.ingest.fitted_state import load_state
from chipscout.indexer.errors import ChipscoutError, IncompatibleTableError
from chipscout.indexer.sources.files import local_source
from chipscout.indexer.ingest import EncoderChoice, index_sources
from chipscout.indexer.ingest.reading import ChipReader, sample_chips
from chipscout.indexer.search import SearchEngine
from chipscout.indexer.store import ChipStore
from chipscout.indexer.ingest.transform import (DEFAULT_TRANSFORMS, SMALL_SAMPLE_TRANSFORM, TransformError, VectorTransform,
                               fit_requested, parse_spec)

from tests.conftest import DATES, TINY_RCF


def correlated(n=2000, d=16, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * np.linspace(5, 0.1, d)[:, None]
    return rng.normal(size=(n, d)) @ mixing + 3.0


def test_whitening_decorrelates_synthetic_data():
    data = correlated()
    transform = VectorTransform("pca-whiten:16:0").fit(data)
    step = transform.steps[0]
    white = transform._apply_step(step, data)
    assert np.allclose(np.cov(white, rowvar=False), np.eye(16), atol=1e-6)
    out = transform.apply(data)
    assert out.shape == (2000, 16) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_reduced_dimension_and_spec_round_trip():
    transform = VectorTransform("power:0.5,standardize,pca-whiten:8:10").fit(correlated())
    assert transform.spec == "power:0.5,standardize,pca-whiten:8:10,l2"
    assert transform.output_dim == 8 and transform.input_dim == 16
    again = VectorTransform.from_state(transform.describe(), transform.to_state())
    probe = correlated(n=5, seed=1)
    assert np.array_equal(transform.apply(probe), again.apply(probe))


def test_refit_is_deterministic():
    data = correlated()
    first = VectorTransform("standardize,pca-whiten:8:0.1").fit(data).apply(data[:10])
    second = VectorTransform("standardize,pca-whiten:8:0.1").fit(data.copy()).apply(data[:10])
    assert np.array_equal(first, second)


@pytest.mark.parametrize("spec", ["", "whiten", "pca-whiten:0", "power:2", "l2:3", "pca-whiten:8:-1"])
def test_bad_specs_are_refused(spec):
    with pytest.raises(TransformError):
        parse_spec(spec)


def test_too_few_vectors_for_the_requested_dimension():
    with pytest.raises(TransformError, match="needs at least 9 vectors"):
        VectorTransform("standardize,pca-whiten:8").fit(correlated(n=8))


def test_constant_dimension_becomes_zero_and_all_constant_is_refused():
    data = correlated()
    data[:, 3] = 7.0
    transform = VectorTransform("standardize,l2").fit(data)
    assert transform.constant_dims == 1
    assert np.all(transform.apply(data)[:, 3] == 0) and np.isfinite(transform.apply(data)).all()
    with pytest.raises(TransformError, match="constant"):
        VectorTransform("standardize").fit(np.ones((10, 4)))


def test_nan_vectors_are_refused_at_fit_and_stay_nan_at_apply():
    data = correlated()
    data[5, 2] = np.nan
    with pytest.raises(TransformError, match="1 of the 2000 vectors"):
        VectorTransform("standardize").fit(data)
    transform = VectorTransform("standardize").fit(correlated())
    out = transform.apply(data[:10])
    assert not np.isfinite(out[5]).all() and np.isfinite(np.delete(out, 5, axis=0)).all()


def test_vectors_of_another_encoder_are_refused():
    transform = VectorTransform("standardize").fit(correlated())
    with pytest.raises(TransformError, match="another encoder"):
        transform.apply(np.ones((2, 32)))


def test_default_transform_is_recorded_with_the_table(indexed_db):
    store = ChipStore(indexed_db, "chips")
    description = store.config.transform
    assert description["spec"] == "power:0.4,standardize,pca-whiten:64:10,l2"
    assert description["input_dim"] == 64 and description["fit_vectors"] == 98
    embedder = Embedder.for_store(store)
    assert embedder.transform.spec == description["spec"]


def test_index_and_query_paths_agree(indexed_db, small_cog):
    """A stored chip, re-read and re-embedded at query time, gives its stored vector and the same
    neighbours as a search by its id."""
    store = ChipStore(indexed_db, "chips")
    embedder = Embedder.for_store(store)
    config = store.config
    source = local_source(small_cog, sensor="sentinel-2-l2a", acquired=DATES["june"], source_id="cut-june")
    reader = ChipReader(list(config.bands), ChipGrid(64, 32), 0.5, None)
    chip = sample_chips([source], reader, 1)[0]
    vector = embedder.embed([chip], 10.0)[0]
    ids, stored = store.vectors([chip.chip_id])
    assert np.allclose(vector, stored[0], atol=1e-5)
    search = SearchEngine(indexed_db, "chips")
    # Each chip has an identical dated copy (similarity 1.0), so ties may order differently:
    # compare the similarities rank by rank and the neighbour sets.
    # Plain, and with the table's default query expansion (5 for this RCF table).
    assert search.default_expand == 5
    for expand in (0, None):
        by_id = [(hit.chip.chip_id, round(hit.similarity, 4))
                 for hit in search.similar_to_chip(chip.chip_id, k=5, expand=expand).results]
        by_vector = [(hit.chip.chip_id, round(hit.similarity, 4)) for hit in search.similar_to_vector(
            vector, k=5, exclude_ids=[chip.chip_id], expand=expand).results]
        assert [s for _, s in by_id] == [s for _, s in by_vector] and len(by_id) == 5
        assert {c for c, s in by_id if s > by_id[-1][1]} == {c for c, s in by_vector if s > by_vector[-1][1]}
        if expand == 0:
            assert by_id[0][1] == pytest.approx(1.0, abs=1e-4)  # the other date's copy


def test_explicit_transform_reduces_dimension_and_appends_reuse_it(small_cog, tmp_path):
    sources = [local_source(small_cog, sensor="sentinel-2-l2a", acquired=DATES["june"], source_id="a")]
    summary = index_sources(sources, db_uri=str(tmp_path / "db"), table_name="t", encoder=TINY_RCF,
                            grid=ChipGrid(64, 32), bands=["blue", "green", "red", "nir"],
                            transform="standardize,pca-whiten:16:0.1", progress=False)
    assert summary.chips_new == 49
    store = ChipStore(str(tmp_path / "db"), "t")
    assert store.config.embedding_dim == 16 and store.config.encoder_dim == 64
    _, vectors = store.all_vectors()
    assert vectors.shape[1] == 16
    other = [local_source(small_cog, sensor="sentinel-2-l2a", acquired=DATES["sept"], source_id="b")]
    kwargs = dict(db_uri=str(tmp_path / "db"), table_name="t", encoder=TINY_RCF,
                  grid=ChipGrid(64, 32), bands=["blue", "green", "red", "nir"], progress=False)
    with pytest.raises(IncompatibleTableError, match="never mixes two transforms"):
        index_sources(other, transform="standardize,l2", **kwargs)
    assert index_sources(other, **kwargs).chips_new == 49  # the default: reuse the table's
    _, both = ChipStore(str(tmp_path / "db"), "t").all_vectors()
    assert both.shape == (98, 16)


def test_explicit_transform_too_big_for_the_sample_is_refused(small_cog, tmp_path):
    sources = [local_source(small_cog, sensor="sentinel-2-l2a", acquired=DATES["june"], source_id="a")]
    with pytest.raises(ChipscoutError, match="needs at least 65 vectors"):
        index_sources(sources, db_uri=str(tmp_path / "db"), table_name="t", encoder=TINY_RCF,
                      grid=ChipGrid(64, 32), bands=["blue", "green", "red", "nir"],
                      transform="standardize,pca-whiten:64", progress=False)


def test_small_table_default_falls_back(small_cog, tmp_path):
    sources = [local_source(small_cog, sensor="sentinel-2-l2a", acquired=DATES["june"], source_id="a")]
    index_sources(sources, db_uri=str(tmp_path / "db"), table_name="t", encoder=TINY_RCF,
                  grid=ChipGrid(64, 32), bands=["blue", "green", "red", "nir"], progress=False)
    assert ChipStore(str(tmp_path / "db"), "t").config.transform["spec"] == "standardize,power:0.5,l2"


def test_family_defaults_fit_empirical_kernels_and_the_default_transform_at_index_time(small_cog, tmp_path):
    """`rcf` with no options: empirical 5x5 kernels fitted on a sample of the sources, then the
    family's default transform fitted on fresh raw vectors; queries re-embed to the stored vectors."""
    sources = [local_source(small_cog, sensor="sentinel-2-l2a", acquired=when, source_id=f"cut-{name}")
               for name, when in DATES.items()]
    summary = index_sources(sources, db_uri=str(tmp_path / "db"), table_name="t",
                            encoder=EncoderChoice("rcf"), grid=ChipGrid(64, 32),
                            bands=["blue", "green", "red", "nir"], progress=False)
    assert summary.chips_new == 98
    store = ChipStore(str(tmp_path / "db"), "t")
    config = store.config
    assert config.encoder_label == "rcf-empirical"
    assert {k: config.encoder_config[k] for k in ("kernels", "kernel_size", "bias", "band_stats")} == {
        "kernels": "empirical", "kernel_size": 5, "bias": -0.2, "band_stats": False}
    state = load_state(store, "encoder")
    assert bool(state["fitted"]) and state["weight"].shape == (512, 4, 5, 5)
    assert float(state["weight"].abs().sum()) > 0  # fitted kernels, not the unfitted zeros
    assert config.transform["spec"] == DEFAULT_TRANSFORMS["rcf"] and config.embedding_dim == 64
    embedder = Embedder.for_store(store)
    reader = ChipReader(list(config.bands), ChipGrid(64, 32), 0.5, None)
    chips = sample_chips(sources[:1], reader, 3)
    ids, stored = store.vectors([c.chip_id for c in chips])
    by_id = dict(zip(ids, stored))
    vectors = embedder.embed(chips, 10.0)
    for chip, vector in zip(chips, vectors):
        assert np.allclose(vector, by_id[chip.chip_id], atol=1e-5)


def test_fit_requested_resolves_the_family_default_and_its_small_sample_fallback():
    rng = np.random.default_rng(0)
    many, few = rng.standard_normal((100, 80)), rng.standard_normal((20, 80))
    assert fit_requested("default", "rcf", many).spec == DEFAULT_TRANSFORMS["rcf"]
    assert fit_requested(None, "rcf", many).spec == DEFAULT_TRANSFORMS["rcf"]
    # Too few vectors (or dimensions) for the default's 64 PCA components: the small transform.
    assert fit_requested("default", "rcf", few).spec == SMALL_SAMPLE_TRANSFORM
    assert fit_requested("default", "rcf", rng.standard_normal((100, 32))).spec == SMALL_SAMPLE_TRANSFORM
    assert fit_requested("none", "rcf", many) is None
    assert fit_requested("default", "band-stats", many) is None  # no family default
    with pytest.raises(TransformError, match="needs at least 65 vectors"):
        fit_requested("pca-whiten:64,l2", "rcf", few)  # an explicit spec is never swapped
