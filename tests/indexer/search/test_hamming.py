"""The sketch scan's compiled passes (`chipscout.indexer.search.hamming`) against numpy: the same
distances, refusals and samples, and the same candidates from `BinarySketch.search` either way."""

from dataclasses import replace

import numpy as np
import pytest

from chipscout.indexer.search import SearchEngine, SearchFilters, hamming
from chipscout.indexer.search.warm import BinarySketch
from tests.indexer.grouped_tables import DIM, POLICY, _rows, _write



@pytest.mark.parametrize("words", [1, 2, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_compiled_distances_equal_numpys(words, masked):
    rng = np.random.default_rng(words)
    columns = [rng.integers(0, 2**64, 5000, dtype=np.uint64) for _ in range(words)]
    code = rng.integers(0, 2**64, 4, dtype=np.uint64)
    start, stop = 123, 4567
    allowed = rng.random(stop - start) < 0.3 if masked else None
    refused, dtype = (255, np.uint8) if words <= 2 else (257, np.uint16)
    near, histogram = hamming.distances(columns, code, start, stop, allowed, refused, dtype, 16)
    expected = sum(np.bitwise_count(c[start:stop] ^ w).astype(np.int64) for c, w in zip(columns, code))
    if masked:
        expected[~allowed] = refused
    assert near.dtype == dtype and list(near) == list(expected)
    assert list(histogram) == list(np.bincount(expected[::16], minlength=refused + 1))

    # The second stage: `near` as the first stage's distances, the later words added to them.
    cut = int(np.median(expected[expected < refused]))
    later = columns[words // 2:] if words > 1 else []
    rows, distances = hamming.pick(near, cut, later, code[words // 2:], start)
    kept = np.flatnonzero(expected <= cut)
    assert list(rows) == list(start + kept)
    full = expected + sum((np.bitwise_count(c[start:stop] ^ w).astype(np.int64)
                           for c, w in zip(later, code[words // 2:])), np.zeros(stop - start, np.int64))
    assert distances.dtype == np.uint16 and list(distances) == list(full[kept])


@pytest.mark.parametrize("filters", [None, SearchFilters.build(date_from="2023-03-01", date_to="2024-09-30"),
                                     SearchFilters.build(max_cloud_fraction=0.7, bbox=(0, 40, 15, 50))],
                         ids=["none", "dates", "cloud and area"])
@pytest.mark.parametrize("shape", ["one stage", "two stages", "two stages, two chunks", "64 bits"])
def test_the_sketch_picks_the_same_candidates_compiled_or_not(tmp_path, monkeypatch, filters, shape):
    if shape != "one stage":
        monkeypatch.setattr(BinarySketch, "ONE_STAGE_WINDOW", 0)
    if shape == "two stages, two chunks":
        monkeypatch.setattr(BinarySketch, "THREAD_MIN_ROWS", 0)
    bits = 64 if shape == "64 bits" else 256
    rng = np.random.default_rng(7)
    latent = rng.standard_normal((40, 16))[rng.integers(0, 40, 4000)] + rng.standard_normal((4000, 16))
    vectors = latent @ rng.standard_normal((16, DIM)) + 0.3 * rng.standard_normal((4000, DIM))
    _write(str(tmp_path / "db"), "blurred", _rows(vectors.astype(np.float32), seed=7))
    policy = replace(POLICY, sketch_min_rows=1000, sketch_candidates=40, sketch_bits=bits)
    engine = SearchEngine(str(tmp_path / "db"), "blurred", index_policy=policy)
    engine.warm_up()
    sketch = engine.searcher._warm.sketch
    assert sketch.bits == bits
    for i in rng.choice(4000, 8, replace=False):
        query = vectors[i] + 0.3 * rng.standard_normal(DIM)
        for count in (10, 40):
            compiled = sketch.search(query, filters, count, 2 * count)
            monkeypatch.setattr(hamming, "AVAILABLE", False)
            plain = sketch.search(query, filters, count, 2 * count)
            monkeypatch.setattr(hamming, "AVAILABLE", True)
            assert list(np.sort(compiled[0])) == list(np.sort(plain[0]))
            assert compiled[1:] == plain[1:]
