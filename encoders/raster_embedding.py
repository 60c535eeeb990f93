"""Published per-pixel embedding rasters as an encoder: de-quantise, mask nodata, pool each chip.

AlphaEarth Foundations (`aef`), TESSERA (`tessera`) and any other product (`raster-embedding`)
already hold one embedding per pixel; the "model" here only turns stored numbers back into
vectors and pools a chip's pixels into one vector: the mean of the valid pixels' unit vectors,
renormalised, which is how AlphaEarth builds its own overviews (docs/products.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from chipscout.encoders.base import ChipEncoder, EncoderError
from chipscout.encoders.registry import register_encoder

#: Named de-quantisations. "aef": sign(v) * (|v| / 127.5) ** 2 (AlphaEarth's int8 mapping);
#: "per-pixel-scale": channels[:-1] * channels[-1] (TESSERA's int8 values times a float scale);
#: "linear": v * scale + offset (1 and 0 for products stored as float).
DEQUANTIZATIONS = ("aef", "per-pixel-scale", "linear")


def dequantize(values: torch.Tensor, how: str, scale: float = 1.0, offset: float = 0.0,
               dim: int = 1) -> torch.Tensor:
    """Stored values -> float32 embeddings along channel axis `dim` ((B, C, H, W) -> (B, D, H, W)
    by default; D = C - 1 for a per-pixel scale, the last channel)."""
    values = values.float()
    if how == "aef":  # sign(v) * (|v| / 127.5)^2, as |v| * v / 127.5^2: fewer passes
        return values.abs().mul_(values).mul_(1.0 / 127.5 ** 2)
    if how == "per-pixel-scale":
        channels = values.shape[dim]
        return values.narrow(dim, 0, channels - 1) * values.narrow(dim, channels - 1, 1)
    if how == "linear":
        return values * scale + offset
    raise EncoderError(f"unknown de-quantisation {how!r}; known: {', '.join(DEQUANTIZATIONS)}")


@register_encoder("raster-embedding")
class RasterEmbedding(ChipEncoder):
    """(B, C, H, W) stored product values -> (B, D) pooled embeddings.

    in_channels: channels read per pixel (for "per-pixel-scale", the last one is the scale).
    dequantize: one of `DEQUANTIZATIONS`; scale/offset for "linear".
    product, year: what the table holds (recorded in its config, so a table never mixes products).
    nodata: the stored value that marks a pixel without an embedding (recorded; the reader masks it).
    cell_px: side in pixels of the cells `local_vectors` pools to (1: every pixel).
    """

    family = "raster-embedding"
    #: Products are read as stored: no reflectance scaling, no standardisation.
    input_scaling = "none"

    def __init__(self, in_channels: int, dequantize: str = "linear", scale: float = 1.0, offset: float = 0.0,
                 product: str = "raster-embedding", year: int | None = None, nodata: float | None = None,
                 cell_px: int = 1) -> None:
        super().__init__()
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise EncoderError(f"in_channels must be a positive integer, got {in_channels!r}")
        if dequantize not in DEQUANTIZATIONS:
            raise EncoderError(f"unknown de-quantisation {dequantize!r}; known: {', '.join(DEQUANTIZATIONS)}")
        if dequantize == "per-pixel-scale" and in_channels < 2:
            raise EncoderError("a per-pixel scale needs at least one channel besides the scale")
        if not (isinstance(scale, (int, float)) and isinstance(offset, (int, float))) or scale == 0:
            raise EncoderError(f"scale must be a non-zero number and offset a number, got {scale!r}, {offset!r}")
        if year is not None and (isinstance(year, bool) or not isinstance(year, int) or not 1900 <= year <= 2200):
            raise EncoderError(f"year must be a four-digit year, got {year!r}")
        if isinstance(cell_px, bool) or not isinstance(cell_px, int) or cell_px < 1:
            raise EncoderError(f"cell_px must be a positive integer, got {cell_px!r}")
        self.in_channels = in_channels
        self.dequantize = dequantize
        self.scale = float(scale)
        self.offset = float(offset)
        self.product = product
        self.year = year
        self.nodata = None if nodata is None else float(nodata)
        self.cell_px = cell_px

    @property
    def embedding_dim(self) -> int:
        return self.in_channels - 1 if self.dequantize == "per-pixel-scale" else self.in_channels

    @property
    def name(self) -> str:
        return f"{self.product}-{self.year}" if self.year is not None else self.product

    def config(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "dequantize": self.dequantize, "scale": self.scale,
                "offset": self.offset, "product": self.product, "year": self.year, "nodata": self.nodata,
                "cell_px": self.cell_px}

    # ------------------------------------------------------------------ pixels -> unit vectors
    def _check(self, pixels: torch.Tensor, valid_mask: torch.Tensor | None) -> torch.Tensor:
        """The (B, H, W) validity of a well-formed batch (all True without a mask)."""
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4:
            raise EncoderError(f"{self.product} expects pixels of shape (B, C, H, W), got "
                               f"{getattr(pixels, 'shape', type(pixels).__name__)}")
        if pixels.shape[1] != self.in_channels:
            raise EncoderError(f"pixels have {pixels.shape[1]} channel(s), the {self.product} encoder "
                               f"reads {self.in_channels}")
        valid = torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.bool, device=pixels.device)
        if valid_mask is not None:
            expected = (pixels.shape[0], *pixels.shape[2:])
            if tuple(valid_mask.shape) != expected or valid_mask.dtype != torch.bool:
                raise EncoderError(f"valid_mask must be bool of shape {expected}, "
                                   f"got {valid_mask.dtype} {tuple(valid_mask.shape)}")
            valid = valid_mask.to(pixels.device)
        return valid

    def _vectors_and_weights(self, pixels: torch.Tensor, valid_mask: torch.Tensor | None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, H*W, D) de-quantised vectors, channel last, (B, H*W) weights 1 / |v| on valid
        pixels (0 elsewhere: nodata, and all-zero vectors, which carry no direction) and the
        (B, H, W) validity. Unit vectors are never materialised where a pooled sum will do.

        Channel last, in a handful of whole-batch ops: a norm across the strided channel axis,
        or a loop over channel planes, is several times slower on a busy 2-core CPU, where every
        parallel op waits on both cores (measured in bench/products.py)."""
        valid = self._check(pixels, valid_mask)
        batch, channels, height, width = pixels.shape
        stored = pixels.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # one copy
        vectors = dequantize(stored, self.dequantize, self.scale, self.offset, dim=2)
        norms = torch.linalg.vector_norm(vectors, dim=2)  # (B, P)
        valid = valid & (norms > 0).view(batch, height, width)
        weights = torch.where(valid.view(batch, -1), 1.0 / norms.clamp_min(1e-30),
                              torch.zeros((), device=norms.device))
        return vectors, weights, valid

    def _unit_pixels(self, pixels: torch.Tensor, valid_mask: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, H, W) unit vectors per pixel (zeros where invalid) and the (B, H, W) validity."""
        vectors, weights, valid = self._vectors_and_weights(pixels, valid_mask)
        unit = vectors * weights[:, :, None]
        if not bool(torch.isfinite(unit).all()):
            raise EncoderError(f"{self.product} values de-quantise to NaN or infinity outside nodata")
        batch, _, height, width = pixels.shape
        return unit.view(batch, height, width, -1).permute(0, 3, 1, 2), valid

    def forward(
        self,
        pixels: torch.Tensor,
        waves_um: torch.Tensor | None = None,
        *,
        valid_mask: torch.Tensor | None = None,
        gsd_m: float | None = None,
        time: torch.Tensor | None = None,
        latlon: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, D): each chip's mean of its valid pixels' unit vectors, renormalised."""
        vectors, weights, valid = self._vectors_and_weights(pixels, valid_mask)
        counts = valid.flatten(1).sum(dim=1)  # (B,)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise EncoderError(f"chip(s) {empty} of the batch have no valid {self.product} pixel")
        # Sum over pixels of v / |v| (the mean's 1 / count does not change its direction).
        summed = torch.bmm(weights[:, None, :], vectors)[:, 0]  # (B, D)
        if not bool(torch.isfinite(summed).all()):
            raise EncoderError(f"{self.product} values de-quantise to NaN or infinity outside nodata")
        return F.normalize(summed, dim=1)

    # ------------------------------------------------------------------ heatmaps (#20)
    @property
    def local_cell_px(self) -> int:
        """Input pixels per side of one cell of `local_vectors`."""
        return self.cell_px

    def local_vectors(self, pixels: torch.Tensor, waves_um: torch.Tensor | None = None, *,
                      valid_mask: torch.Tensor | None = None, gsd_m: float | None = None,
                      time: torch.Tensor | None = None, latlon: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D, H / cell, W / cell) unit vectors in `forward`'s space: each cell pooled like a
        chip (mean of its valid pixels' unit vectors, renormalised); a cell with no valid pixel is
        all zeros."""
        unit, valid = self._unit_pixels(pixels, valid_mask)
        if self.cell_px == 1:
            return unit
        weight = valid[:, None].float()
        summed = F.avg_pool2d(unit * weight, self.cell_px, self.cell_px)  # mean over the cell
        return F.normalize(summed, dim=1)


def _fixed(product: str, what: str, given: Any, expected: Any) -> None:
    if given != expected:
        raise EncoderError(f"the {product} encoder has {what} {expected!r}, not {given!r}; use "
                           "--encoder raster-embedding for another product")


@register_encoder("aef")
class AlphaEarthEmbedding(RasterEmbedding):
    """AlphaEarth Foundations Satellite Embedding: 64 int8 channels A00..A63, -128 nodata,
    de-quantised as sign(v) * (|v| / 127.5) ** 2 (Google's GCS readme)."""

    family = "aef"

    def __init__(self, in_channels: int = 64, dequantize: str = "aef", scale: float = 1.0, offset: float = 0.0,
                 product: str = "aef", year: int | None = None, nodata: float | None = -128.0,
                 cell_px: int = 1) -> None:
        for what, given, expected in (("in_channels", in_channels, 64), ("dequantize", dequantize, "aef"),
                                      ("product", product, "aef"), ("nodata", nodata, -128.0)):
            _fixed("aef", what, given, expected)
        super().__init__(in_channels, dequantize, scale, offset, product, year, nodata, cell_px)


@register_encoder("tessera")
class TesseraEmbedding(RasterEmbedding):
    """TESSERA: 128 int8 channels times a float32 per-pixel scale (geotessera's de-quantisation),
    read as 129 channels (the scale last); a zero or NaN scale marks a pixel without data."""

    family = "tessera"

    def __init__(self, in_channels: int = 129, dequantize: str = "per-pixel-scale", scale: float = 1.0,
                 offset: float = 0.0, product: str = "tessera", year: int | None = None,
                 nodata: float | None = None, cell_px: int = 1) -> None:
        for what, given, expected in (("in_channels (128 + the scale)", in_channels, 129),
                                      ("dequantize", dequantize, "per-pixel-scale"), ("product", product, "tessera")):
            _fixed("tessera", what, given, expected)
        super().__init__(in_channels, dequantize, scale, offset, product, year, nodata, cell_px)
