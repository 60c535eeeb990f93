"""Where in a chip the match lies: per-cell similarity grids (heatmaps) and ranking by best cell.

A heatmap is computed on demand for the chips asked about (the results shown), in one of two ways:

* "pixels": the chip's pixels are read again through the source its row records (`source_path`,
  `row_off`, `col_off`, `size_px`), scaled as the table scales them, and the table's encoder gives
  its local vectors (`ChipEncoder.local_vectors`); each cell vector goes through the table's fitted
  transform (or L2) like a stored chip vector, and its cosine with the query is the cell's value.
* "patches": a table built with `--pooling patch` keeps every chip's patch tokens; they are read
  from the store and nothing is re-read or re-embedded.

A chip whose source cannot be re-read (moved, deleted, unreachable) gets a `Heatmap` with no grid
and a `note` saying why; the other chips still get theirs. Nothing is written to the table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chipscout.indexer.errors import ChipscoutError, QueryError

if TYPE_CHECKING:
    from chipscout.indexer.search.engine import ChipRecord, SearchEngine, SearchResponse, SearchResult

#: How heatmaps are made: "auto" = stored patch vectors when the table keeps them, else pixels.
HEATMAP_SOURCES = ("auto", "pixels", "patches")
#: Chips re-ranked by best cell when no pool is given: the whole-chip search's top this many.
DEFAULT_RERANK_POOL = 100


@dataclass(frozen=True)
class Heatmap:
    """Cosine similarity of each cell of one chip to a query, with the cells' georeferencing."""

    chip_id: str
    similarity: np.ndarray | None
    """(rows, cols) float32, NaN where a cell has no valid pixel; None when none could be made."""
    crs: str | None = None
    """The CRS of `transform` (the chip's source grid), e.g. `EPSG:32618`."""
    transform: tuple[float, float, float, float, float, float] | None = None
    """Affine (a, b, c, d, e, f) from (col, row) of the grid to `crs` coordinates (rasterio's order)."""
    cell_px: int = 0
    """Source pixels per cell side."""
    origin: str = ""
    """"pixels" (re-read and re-embedded) or "patches" (stored patch vectors)."""
    note: str = ""
    """Why there is no grid (the source moved, the encoder gives no local vectors, ...)."""

    @property
    def ok(self) -> bool:
        return self.similarity is not None

    @property
    def best_similarity(self) -> float:
        """The highest cell value (NaN without a grid or without a valid cell)."""
        if self.similarity is None or not np.isfinite(self.similarity).any():
            return math.nan
        return float(np.nanmax(self.similarity))

    @property
    def best_cell(self) -> tuple[int, int] | None:
        """(row, col) of the best cell, or None."""
        if self.similarity is None or not np.isfinite(self.similarity).any():
            return None
        flat = int(np.nanargmax(self.similarity))
        return divmod(flat, self.similarity.shape[1])

    def to_dict(self) -> dict[str, Any]:
        grid = None if self.similarity is None else [
            [None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in self.similarity]
        return {"chip_id": self.chip_id, "origin": self.origin, "cell_px": self.cell_px,
                "crs": self.crs, "transform": list(self.transform) if self.transform else None,
                "best_cell": self.best_cell, "note": self.note, "similarity": grid}


@dataclass(frozen=True)
class CellRanked:
    """A result re-ranked by its best-matching cell: the whole-chip result and its heatmap."""

    rank: int
    result: SearchResult
    heatmap: Heatmap
    score: float
    """The best cell's similarity (-inf when the chip has no heatmap: it sorts last)."""


@dataclass
class CellGrid:
    vectors: np.ndarray  # (rows, cols, D) unit vectors in the table's space, NaN rows for empty cells
    crs: str | None
    transform: tuple[float, ...] | None
    cell_px: int
    origin: str


@dataclass
class WhereInChip:
    """Heatmaps for the chips of one table. Builds the table's encoder once, on first use."""

    engine: SearchEngine
    device: str | None = None
    checkpoint: str | None = None
    _embedder: Any = field(default=None, init=False, repr=False)
    _keeps_patches: bool | None = field(default=None, init=False, repr=False)
    _patch_transform: Any = field(default=None, init=False, repr=False)

    # -- the public face ------------------------------------------------------------------------
    def heatmaps(self, chips: Sequence[ChipRecord], query_vector: Sequence[float] | np.ndarray,
                 use: str = "auto") -> list[Heatmap]:
        """One `Heatmap` per chip, in order: each cell's cosine similarity to `query_vector` (a
        vector of the table's space, e.g. a chip's stored vector or a seed set's mean)."""
        query = self._unit(query_vector)
        maps = []
        for chip, grid in zip(chips, self.cell_grids(chips, use)):
            if isinstance(grid, str):
                maps.append(Heatmap(chip.chip_id, None, note=grid))
                continue
            with np.errstate(invalid="ignore"):
                similarity = (grid.vectors @ query).astype(np.float32)
            maps.append(Heatmap(chip.chip_id, similarity, grid.crs, grid.transform, grid.cell_px,
                                grid.origin))
        return maps

    def cell_vector(self, chip: ChipRecord, row: int, col: int, use: str = "auto") -> np.ndarray:
        """The unit vector of one cell of `chip` (a query for "this small thing")."""
        grid = self.cell_grids([chip], use)[0]
        if isinstance(grid, str):
            raise QueryError(grid)
        rows, cols = grid.vectors.shape[:2]
        if not (0 <= row < rows and 0 <= col < cols):
            raise QueryError(f"cell ({row}, {col}) is outside chip {chip.chip_id}'s {rows} x {cols} grid")
        vector = grid.vectors[row, col]
        if not np.isfinite(vector).all():
            raise QueryError(f"cell ({row}, {col}) of chip {chip.chip_id} holds no valid pixel")
        return vector

    def rerank(self, results: Sequence[SearchResult], query_vector: Sequence[float] | np.ndarray,
               use: str = "auto") -> list[CellRanked]:
        """`results` ordered by their best cell's similarity to the query ("find a small thing
        anywhere inside a chip"); ties and chips without a heatmap keep their whole-chip order."""
        maps = self.heatmaps([r.chip for r in results], query_vector, use)
        scores = [m.best_similarity for m in maps]
        order = sorted(range(len(results)),
                       key=lambda i: (-(scores[i] if math.isfinite(scores[i]) else -math.inf), i))
        return [CellRanked(rank, results[i], maps[i],
                           scores[i] if math.isfinite(scores[i]) else -math.inf)
                for rank, i in enumerate(order, start=1)]

    # -- how grids are made ---------------------------------------------------------------------
    def _unit(self, vector: Sequence[float] | np.ndarray) -> np.ndarray:
        from chipscout.indexer.search.engine import _unit_query_vector

        return _unit_query_vector(vector, self.engine.config.embedding_dim).astype(np.float32)

    def _origin(self, use: str) -> str:
        if use not in HEATMAP_SOURCES:
            raise QueryError(f"heatmap source must be one of {', '.join(HEATMAP_SOURCES)}, got {use!r}")
        if self._keeps_patches is None:
            self._keeps_patches = self.engine.store.config.encoder_config.get("pooling") == "patch"
        if use == "patches" and not self._keeps_patches:
            raise QueryError(f"table {self.engine.table_name!r} keeps no patch vectors (built without "
                             "--pooling patch); use the pixels")
        return "patches" if (use == "patches" or (use == "auto" and self._keeps_patches)) else "pixels"

    def cell_grids(self, chips: Sequence[ChipRecord], use: str = "auto") -> list[CellGrid | str]:
        """Per chip, its cells' unit vectors in the table's space (`CellGrid`), or a note saying why
        there are none; what `heatmaps` compares a query with (benchmarks reuse them across queries)."""
        origin = self._origin(use)
        if origin == "patches":
            return [self._patch_grid(chip) for chip in chips]
        return self._pixel_grids(chips)

    def _encoder(self):
        if self._embedder is None:
            from chipscout.indexer.ingest.embedding import Embedder

            self._embedder = Embedder.for_store(self.engine.store, self.device, self.checkpoint)
            try:
                _ = self._embedder.encoder.local_cell_px
            except Exception as err:  # EncoderError: the family gives no local vectors
                self._embedder = None
                raise QueryError(f"table {self.engine.table_name!r}: {err}") from None
        return self._embedder

    def _pixel_grids(self, chips: Sequence[ChipRecord]) -> list[CellGrid | str]:
        embedder = self._encoder()
        grids: list[CellGrid | str] = []
        readers: dict[str, Any] = {}
        failed: dict[str, str] = {}  # a source that failed to open is not tried again per chip
        try:
            for chip in chips:
                try:
                    if chip.source_path in failed:
                        raise ChipscoutError(failed[chip.source_path])
                    reader = readers.get(chip.source_path)
                    if reader is None:
                        try:
                            reader = readers[chip.source_path] = _open_source(
                                chip.source_path, self.engine.config)
                        except ChipscoutError as err:
                            failed[chip.source_path] = str(err)
                            raise
                    pixels, valid = reader.read_window(chip.row_off, chip.col_off, chip.size_px)
                except ChipscoutError as err:
                    grids.append(f"chip {chip.chip_id}: its source cannot be read again ({err})")
                    continue
                grids.append(self._embed_cells(embedder, chip, pixels, valid, reader.grid))
        finally:
            for reader in readers.values():
                reader.close()
        return grids

    def _embed_cells(self, embedder: Any, chip: ChipRecord, pixels: np.ndarray, valid: np.ndarray,
                     pixel_grid: Any) -> CellGrid | str:
        import torch
        from affine import Affine

        from chipscout.indexer.ingest.embedding import latlon_encoding, scaled_input, time_encoding

        band_count = len(embedder.band_wavelengths_um)
        if not valid.any():
            return f"chip {chip.chip_id}: no valid pixel at its place in {chip.source_path} any more"
        device = embedder.device
        tensor = torch.from_numpy(np.ascontiguousarray(pixels[None, :band_count])).to(device)
        mask = torch.from_numpy(valid[None]).to(device)
        tensor = scaled_input(tensor, mask, embedder.normalization)
        time = torch.tensor([time_encoding(chip.acquired)], device=device)
        latlon = torch.tensor([latlon_encoding(chip.center_lon, chip.center_lat)], device=device)
        with torch.inference_mode():
            local = embedder.encoder.local_vectors(
                tensor, torch.tensor(embedder.band_wavelengths_um, dtype=torch.float32, device=device),
                valid_mask=mask, gsd_m=chip.gsd_m, time=time, latlon=latlon)
        grid = local[0].permute(1, 2, 0).float().cpu().numpy()  # (rows, cols, D)
        cell = embedder.encoder.local_cell_px
        transform = pixel_grid.transform @ Affine.translation(chip.col_off, chip.row_off) @ Affine.scale(cell)
        return CellGrid(self._finished(grid, embedder.finish), str(pixel_grid.crs),
                         tuple(transform)[:6], cell, "pixels")

    @staticmethod
    def _finished(grid: np.ndarray, finish: Any) -> np.ndarray:
        """Cell vectors through the table's transform (or L2); empty (NaN) cells stay NaN."""
        rows, cols, dim = grid.shape
        flat = grid.reshape(rows * cols, dim)
        good = np.isfinite(flat).all(axis=1)
        out = None
        if good.any():
            done = np.asarray(finish(np.ascontiguousarray(flat[good])), dtype=np.float32)
            out = np.full((rows * cols, done.shape[1]), np.nan, dtype=np.float32)
            out[good] = done
        else:
            out = np.full((rows * cols, dim), np.nan, dtype=np.float32)
        return out.reshape(rows, cols, -1)

    def _patch_grid(self, chip: ChipRecord) -> CellGrid | str:
        from chipscout.indexer.ingest.embedding import stored_transform

        rows = self.engine.store.patch_vectors(chip.chip_id)
        if rows.num_rows == 0:
            return f"chip {chip.chip_id}: the table keeps no patch vectors for it"
        patch_rows = np.asarray(rows["patch_row"].to_numpy())
        patch_cols = np.asarray(rows["patch_col"].to_numpy())
        vectors = np.asarray(rows["vector"].combine_chunks().flatten().to_numpy(), dtype=np.float32)
        vectors = vectors.reshape(rows.num_rows, -1)
        grid = np.full((patch_rows.max() + 1, patch_cols.max() + 1, vectors.shape[1]), np.nan, np.float32)
        grid[patch_rows, patch_cols] = vectors
        if self._patch_transform is None:  # read once: the table's transform, or False for none
            self._patch_transform = stored_transform(self.engine.store) or False
        if self._patch_transform:
            grid = self._finished(grid, self._patch_transform.apply)
        cell = int(self.engine.config.encoder_config.get("patch_size", 8))
        crs, affine = _footprint_georeference(chip, grid.shape[0], grid.shape[1])
        return CellGrid(grid, crs, affine, cell, "patches")


def _open_source(source_path: str, config: Any):
    """A `RasterReader` of a table's recorded source (a local file or folder, or a STAC item URL),
    restricted to the table's bands; a `ChipscoutError` naming the path when it cannot be opened."""
    from chipscout.indexer.sources import RasterReader, is_remote, local_source

    try:
        if is_remote(source_path):
            import pystac

            from chipscout.indexer.sensors import get_sensor
            from chipscout.indexer.sources.stac import (
                HrefPolicy, is_planetary_computer, item_source, planetary_computer_signer,
            )

            try:
                item = pystac.Item.from_file(source_path)
            except Exception as err:  # any transport or JSON error: say what failed, once
                raise ChipscoutError(f"{source_path}: not a readable STAC item ({type(err).__name__})") from None
            signer = planetary_computer_signer() if is_planetary_computer(source_path) else None
            if signer is not None:  # the item fetched anew has unsigned hrefs: sign as at indexing
                item = signer(item) or item
            # The item is fetched anew and may have changed: its asset hrefs pass the same check
            # as at indexing (the API's own origin, or hosts in $CHIPSCOUT_ALLOW_HOSTS).
            source = item_source(item, get_sensor(config.sensor), HrefPolicy.build(source_path))
        elif not Path(source_path).exists():
            raise ChipscoutError(f"{source_path}: no such file or folder (moved or deleted?)")
        else:
            source = local_source(source_path, sensor=config.sensor)
        return RasterReader(source.select_bands(list(config.bands)))
    except ChipscoutError:
        raise
    except Exception as err:  # rasterio errors of a damaged file
        raise ChipscoutError(f"{source_path}: {err}") from None


def _footprint_georeference(chip: ChipRecord, rows: int, cols: int
                            ) -> tuple[str, tuple[float, float, float, float, float, float]]:
    """An axis-aligned lon/lat grid over the chip's footprint bounds: where the source grid is not
    opened (stored patch vectors), cells are placed by the footprint alone (a small skew for
    projected grids)."""
    west, south, east, north = chip.footprint.bounds
    return "EPSG:4326", ((east - west) / cols, 0.0, west, 0.0, -(north - south) / rows, north)


# ----------------------------------------------------------------------------- files
def write_heatmaps(heatmaps: Sequence[Heatmap], out_dir: str | Path, *, geotiff: bool = True,
                   png: bool = True, thumbnails: dict[str, bytes | None] | None = None,
                   prefix: str = "") -> list[Path]:
    """Write each heatmap as `<rank>_<chip_id>.tif` (one float32 band, NaN nodata, georeferenced)
    and/or `<rank>_<chip_id>.png` (the heatmap coloured over the chip's thumbnail when there is one,
    else alone). Chips without a heatmap get `<rank>_<chip_id>.txt` with the note. One file per
    result: results lie on different grids, so one multi-band GeoTIFF could not georeference them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for rank, heatmap in enumerate(heatmaps, start=1):
        stem = out / f"{prefix}{rank:03d}_{heatmap.chip_id}"
        if not heatmap.ok:
            path = stem.with_suffix(".txt")
            path.write_text(heatmap.note + "\n")
            written.append(path)
            continue
        if geotiff:
            written.append(_write_geotiff(heatmap, stem.with_suffix(".tif")))
        if png:
            thumbnail = (thumbnails or {}).get(heatmap.chip_id)
            written.append(_write_png(heatmap, stem.with_suffix(".png"), thumbnail))
    return written


def _write_geotiff(heatmap: Heatmap, path: Path) -> Path:
    import rasterio
    from affine import Affine

    grid = heatmap.similarity
    with rasterio.open(path, "w", driver="GTiff", width=grid.shape[1], height=grid.shape[0], count=1,
                       dtype="float32", crs=heatmap.crs, transform=Affine(*heatmap.transform),
                       nodata=float("nan")) as out:
        out.write(grid.astype(np.float32), 1)
        out.update_tags(chip_id=heatmap.chip_id, origin=heatmap.origin, cell_px=str(heatmap.cell_px),
                        meaning="cosine similarity of each cell to the query")
    return path


def heatmap_rgba(heatmap: Heatmap, size_px: int) -> np.ndarray:
    """(size, size, 4) uint8: the grid scaled to [min, max] of its cells, red = best, blue =
    worst (nearest-neighbour upsampling, so each cell stays a visible square), half transparent;
    cells without a value fully transparent."""
    grid = heatmap.similarity
    finite = np.isfinite(grid)
    low = float(np.nanmin(grid)) if finite.any() else 0.0
    high = float(np.nanmax(grid)) if finite.any() else 1.0
    scaled = np.where(finite, (grid - low) / (high - low if high > low else 1.0), 0.0)
    rows = (np.arange(size_px) * grid.shape[0]) // size_px
    cols = (np.arange(size_px) * grid.shape[1]) // size_px
    value = scaled[rows[:, None], cols[None, :]]
    alpha = np.where(finite[rows[:, None], cols[None, :]], 150, 0)
    rgba = np.stack([255 * value, 60 * np.ones_like(value), 255 * (1 - value), alpha], axis=-1)
    return rgba.astype(np.uint8)


def overlay_png(heatmap: Heatmap, thumbnail: bytes | None, size_px: int = 256) -> bytes:
    """PNG bytes: the heatmap over the thumbnail (or alone when the chip has none)."""
    import io

    from PIL import Image

    base = (Image.open(io.BytesIO(thumbnail)).convert("RGBA").resize((size_px, size_px))
            if thumbnail else Image.new("RGBA", (size_px, size_px), (0, 0, 0, 255)))
    layer = Image.fromarray(heatmap_rgba(heatmap, size_px), "RGBA")
    buffer = io.BytesIO()
    Image.alpha_composite(base, layer).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_png(heatmap: Heatmap, path: Path, thumbnail: bytes | None) -> Path:
    path.write_bytes(overlay_png(heatmap, thumbnail))
    return path


# ----------------------------------------------------------------------------- one call for front ends
@dataclass(frozen=True)
class WhereAnswer:
    """A search with a heatmap per result (aligned with `response.results`)."""

    response: SearchResponse
    heatmaps: list[Heatmap]
    query_vector: np.ndarray
    ranked_by: str
    """"chip" (whole-chip similarity) or "cell" (the best cell's similarity)."""


def search_where(engine: SearchEngine, query: str | Sequence[float] | np.ndarray, k: int = 10,
                 filters: Any = None, *, expand: int | None = None, spread: Any = None,
                 cell: tuple[int, int] | None = None, rank_by_cell: bool = False,
                 pool: int | None = None, use: str = "auto", exclude_ids: Sequence[str] = ()) -> WhereAnswer:
    """Search by a chip id or a vector and compute the results' heatmaps.

    cell: (row, col) of the query chip's cell grid to search for instead of the whole chip (a small
    thing inside it); the whole-chip search then runs with that cell's vector.
    rank_by_cell: fetch `pool` (default max(`DEFAULT_RERANK_POOL`, k)) whole-chip results and
    order them by their best cell; the k best are returned, their `similarity` still the
    whole-chip one, the best cell's value in their heatmap.
    """
    from dataclasses import replace

    from chipscout.indexer.search.engine import SearchResult, validate_k

    k = validate_k(k)
    where = WhereInChip(engine)
    query_chip = engine.get_chip(query) if isinstance(query, str) else None
    if cell is not None:
        if query_chip is None:
            raise QueryError("a query cell needs a query chip id")
        vector = where.cell_vector(query_chip, int(cell[0]), int(cell[1]), use)
    else:
        vector = engine.get_vector(query) if query_chip is not None else where._unit(query)
    fetch = max(pool or DEFAULT_RERANK_POOL, k) if rank_by_cell else k
    if query_chip is not None:
        response = engine.similar_to_chip(query_chip.chip_id, fetch, filters, expand=expand, spread=spread) \
            if cell is None else engine.similar_to_vector(vector, fetch, filters, [query_chip.chip_id],
                                                          expand=expand, spread=spread)
    else:
        response = engine.similar_to_vector(vector, fetch, filters, exclude_ids, expand=expand, spread=spread)
    if not rank_by_cell:
        maps = where.heatmaps([r.chip for r in response.results], vector, use)
        return WhereAnswer(response, maps, vector, "chip")
    ranked = where.rerank(response.results, vector, use)[:k]
    results = [SearchResult(r.rank, r.result.chip, r.result.distance) for r in ranked]
    return WhereAnswer(replace(response, results=results, method=response.method + "+cell-rerank"),
                       [r.heatmap for r in ranked], vector, "cell")
