"""The transform fit's vectors are stored, not embedded again: every chip is embedded once, and
the table is the one the old two-pass path writes."""

from collections import Counter

import numpy as np
import pytest

from chipscout.indexer.chips import ChipGrid
from chipscout.indexer.ingest import EncoderChoice, index_sources
from chipscout.indexer.ingest.embedding import Embedder
from chipscout.indexer.sources.files import local_source
from chipscout.indexer.store import ChipStore

from tests.conftest import DATES

#: Empirical kernels, as the demo: the encoder is fitted too, then the default transform.
EMPIRICAL = EncoderChoice("rcf", {"features": 64, "seed": 0})


@pytest.fixture
def embedded(monkeypatch):
    """Chip id -> how often the real encoder embedded it (a counting wrapper, nothing faked)."""
    counts: Counter[str] = Counter()
    original = Embedder.embed_with_patches

    def counting(self, chips, gsd_m, raw=False):
        counts.update(chip.chip_id for chip in chips)
        return original(self, chips, gsd_m, raw=raw)

    monkeypatch.setattr(Embedder, "embed_with_patches", counting)
    return counts


def _index(small_cog, db, **options):
    sources = [local_source(small_cog, sensor="sentinel-2-l2a", acquired=when, source_id=f"cut-{name}")
               for name, when in DATES.items()]
    return index_sources(sources, db_uri=str(db), table_name="t", encoder=EMPIRICAL, grid=ChipGrid(64, 32),
                         bands=["blue", "green", "red", "nir"], progress=False, **options)


def _rows(db):
    table = ChipStore(str(db), "t").scan(columns=["chip_id", "vector", "raw_vector"]).sort_by("chip_id")
    return (table["chip_id"].to_pylist(), np.stack(table["vector"].to_numpy(zero_copy_only=False)),
            np.stack(table["raw_vector"].to_numpy(zero_copy_only=False)))


@pytest.mark.parametrize("sample", [2048, 30], ids=["sample-is-the-table", "sample-of-30"])
def test_every_chip_is_embedded_once_and_the_table_matches_the_two_pass_path(small_cog, tmp_path, embedded, sample):
    reused = _index(small_cog, tmp_path / "reused", transform_sample_chips=sample)
    assert reused.chips_new == 98 and reused.chips_failed == 0
    assert len(embedded) == 98 and set(embedded.values()) == {1}, embedded.most_common(3)

    embedded.clear()
    twice = _index(small_cog, tmp_path / "twice", transform_sample_chips=sample, reuse_fit_vectors=False)
    assert twice.chips_new == 98
    assert sum(embedded.values()) == 98 + min(sample, 98)  # the old path: the sample twice

    ids, vectors, raw = _rows(tmp_path / "reused")
    old_ids, old_vectors, old_raw = _rows(tmp_path / "twice")
    assert ids == old_ids
    assert np.array_equal(raw, old_raw) and np.array_equal(vectors, old_vectors)
