"""The contract every chipscout encoder meets (`ChipEncoder`) and its error (`EncoderError`).

Encoders are plain torch modules: they see scaled pixels, band wavelengths and optional
per-chip metadata, and return one float32 vector per chip. They know nothing of storage,
STAC or files, so an index's encoder can be rebuilt anywhere from `config()` + `state_dict()`.
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from chipscout.encoders.errors import EncoderError
# The registry functions are re-exported here: the indexer imports them from `base`.
from chipscout.encoders.registry import (EncoderFactory, build_encoder, encoder_names, encoder_parameters,
                                         load_encoder, register_encoder)

__all__ = ["ChipEncoder", "EncoderError", "EncoderFactory", "LOCAL_CELL_PX", "build_encoder",
           "cell_means", "encoder_names", "encoder_parameters", "load_encoder", "register_encoder"]

#: Input pixels per side of a local-vector cell, for encoders whose cells are not fixed by the
#: model (RCF, band statistics): small enough to place a field or a building, large enough that
#: a 5 x 5 convolution has 64 positions to average.
LOCAL_CELL_PX = 8


def cell_means(values: torch.Tensor, weights: torch.Tensor | None, cell_px: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted means of `values` (B, F, H, W) over cells of `cell_px` x `cell_px` positions.

    weights: (B, H, W) float, 0 where a position must not count (None: all count). The grid is
    ceil(H / cell_px) x ceil(W / cell_px); a last, partial cell averages what it holds.
    Returns (means (B, F, h, w) float32, NaN where a cell has no weight; weight per cell (B, h, w)).
    """
    batch, _, height, width = values.shape
    if weights is None:
        weights = torch.ones((batch, height, width), dtype=torch.float32, device=values.device)
    pad_h, pad_w = (-height) % cell_px, (-width) % cell_px
    weighted = F.pad(values.float() * weights[:, None], (0, pad_w, 0, pad_h))
    total = F.avg_pool2d(weighted, cell_px, divisor_override=1)
    mass = F.avg_pool2d(F.pad(weights[:, None].float(), (0, pad_w, 0, pad_h)), cell_px,
                        divisor_override=1)
    means = torch.where(mass > 0, total / mass.clamp_min(1e-12), torch.full_like(total, math.nan))
    return means, mass[:, 0]


class ChipEncoder(nn.Module, abc.ABC):
    """Base class: (B, C, H, W) pixels -> (B, D) float32 embeddings.

    Subclasses set `family` (e.g. "rcf", "mae") and implement `forward` and `config`.
    `config()` returns the JSON-serialisable constructor arguments; together with
    `state_dict()` (fitted kernels, weights) it rebuilds an identical encoder via
    `encoders.load_encoder`.
    """

    family: ClassVar[str]
    #: How the pipeline should scale raw reflectance before `forward`:
    #: "reflectance" -> DN / 10000 (surface or TOA reflectance, ~[0, 1]);
    #: "standardize" -> (DN - band mean) / band std, from the sensor table.
    input_scaling: ClassVar[str] = "reflectance"
    #: True when the encoder must see a sample of the data before use (empirical RCF).
    requires_fit: ClassVar[bool] = False

    @property
    @abc.abstractmethod
    def embedding_dim(self) -> int:
        """Length D of the vectors `forward` returns."""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serialisable arguments that rebuild this encoder (with its state_dict)."""

    @property
    def name(self) -> str:
        """A short human name recorded in the table metadata, e.g. `rcf-empirical`."""
        return self.family

    @property
    def is_fitted(self) -> bool:
        return True

    def fit(self, pixels: torch.Tensor, valid_mask: torch.Tensor | None = None,
            waves_um: torch.Tensor | None = None) -> None:
        """Fit data-dependent state from a sample batch (B, C, H, W). Default: nothing to fit."""

    @abc.abstractmethod
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
        """Embed a batch.

        pixels: (B, C, H, W) float32, already scaled as `input_scaling` says.
        waves_um: (C,) central wavelengths in micrometres.
        valid_mask: (B, H, W) bool, False where a pixel is nodata.
        gsd_m: ground sample distance in metres.
        time, latlon: (B, 4) sin/cos encodings, zeros meaning "unknown".
        Returns (B, D) float32; a batch of one gives (1, D).
        """

    # -- where in the chip (issue #20) --------------------------------------------------------

    @property
    def local_cell_px(self) -> int:
        """Input pixels per side of one cell of `local_vectors`' grid."""
        raise EncoderError(f"encoder {self.name} gives no local vectors (no grid of cells)")

    def local_vectors(
        self,
        pixels: torch.Tensor,
        waves_um: torch.Tensor | None = None,
        *,
        valid_mask: torch.Tensor | None = None,
        gsd_m: float | None = None,
        time: torch.Tensor | None = None,
        latlon: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A grid of local vectors: (B, D, h, w) float32 in the space of `forward`'s output (before
        any vector transform a table fits), cell (i, j) covering input pixels
        [i*c, (i+1)*c) x [j*c, (j+1)*c) with c = `local_cell_px`; h = ceil(H / c), w = ceil(W / c).
        A cell with no valid pixel to describe is NaN. Inputs as `forward`."""
        raise EncoderError(f"encoder {self.name} gives no local vectors (no grid of cells)")
