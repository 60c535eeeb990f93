"""Pictures for chips without pixels: a false-colour composite of three principal components of
the table's vectors (how AlphaEarth and TESSERA maps are usually shown), for product tables.

The three components and their colour stretch are fitted once, on the table's vectors when its
first run ends, and kept beside the table (fitted state `pca_thumbnails`), so chips added later
are coloured on the same scale. Each chip's picture is its vector's colour.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from chipscout.indexer.ingest.fitted_state import load_state, save_state
from chipscout.indexer.store import ChipStore

STATE_KEY = "pca_thumbnails"
THUMBNAIL_SIDE_PX = 16
FIT_SAMPLE = 20_000
#: Each component's 2nd..98th percentile spans the colour range (a few outliers do not grey it out).
STRETCH_PERCENTILES = (2.0, 98.0)


def fit_pca_colours(vectors: np.ndarray, seed: int = 0) -> dict[str, torch.Tensor]:
    """Mean, the top three principal axes and each axis's colour stretch of (N, D) `vectors`."""
    rng = np.random.default_rng(seed)
    if len(vectors) > FIT_SAMPLE:
        vectors = vectors[rng.choice(len(vectors), FIT_SAMPLE, replace=False)]
    vectors = vectors.astype(np.float64)
    mean = vectors.mean(axis=0)
    centred = vectors - mean
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    components = np.zeros((3, vectors.shape[1]))
    components[: min(3, len(axes))] = axes[:3]
    # A component's sign is arbitrary: fix it so the largest loading is positive (stable colours).
    signs = np.sign(components[np.arange(3), np.abs(components).argmax(axis=1)])
    components *= np.where(signs == 0, 1.0, signs)[:, None]
    projected = centred @ components.T
    low, high = np.percentile(projected, STRETCH_PERCENTILES, axis=0)
    return {"mean": torch.from_numpy(mean), "components": torch.from_numpy(components),
            "low": torch.from_numpy(low), "high": torch.from_numpy(high)}


def colours(vectors: np.ndarray, state: dict[str, torch.Tensor]) -> np.ndarray:
    """(N, 3) uint8 RGB of (N, D) `vectors` under the fitted components and stretch."""
    projected = (vectors.astype(np.float64) - state["mean"].numpy()) @ state["components"].numpy().T
    low, high = state["low"].numpy(), state["high"].numpy()
    scaled = (projected - low) / np.where(high > low, high - low, 1.0)
    return (np.clip(scaled, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def colour_png(rgb: np.ndarray, side_px: int = THUMBNAIL_SIDE_PX) -> bytes:
    image = Image.fromarray(np.broadcast_to(rgb, (side_px, side_px, 3)).copy(), mode="RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def is_product_table(store: ChipStore) -> bool:
    """Tables of published embeddings (imported, or read from per-pixel product rasters)."""
    return store.exists() and (store.config.encoder == "imported" or store.config.normalization.kind == "none")


def fill_pca_thumbnails(store: ChipStore, batch_rows: int = 2048) -> int:
    """Give every chip of `store` without a thumbnail its PCA colour; returns how many were drawn."""
    if not store.exists() or store.count() == 0:
        return 0
    state = load_state(store, STATE_KEY)
    if state is None:
        _, vectors = store.all_vectors()
        state = fit_pca_colours(vectors)
        save_state(store, STATE_KEY, state)
    drawn = 0
    while True:
        rows = store.scan(None, where="thumbnail IS NULL", limit=batch_rows)
        if rows.num_rows == 0:
            return drawn
        vectors = np.stack(rows["vector"].to_numpy(zero_copy_only=False)).astype(np.float32)
        pngs = [colour_png(rgb) for rgb in colours(vectors, state)]
        index = rows.schema.get_field_index("thumbnail")
        rows = rows.set_column(index, rows.schema.field(index), pa.array(pngs, pa.binary()))
        store.upsert(rows)
        drawn += rows.num_rows
