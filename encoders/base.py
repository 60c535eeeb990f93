"""The contract every chipscout encoder meets (`ChipEncoder`) and its error (`EncoderError`).

Encoders are plain torch modules: they see scaled pixels, band wavelengths and optional
per-chip metadata, and return one float32 vector per chip. They know nothing of storage,
STAC or files, so an index's encoder can be rebuilt anywhere from `config()` + `state_dict()`.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import nn

from chipscout.encoders.errors import EncoderError
# The registry functions are re-exported here: the indexer imports them from `base`.
from chipscout.encoders.registry import (EncoderFactory, build_encoder, encoder_names, encoder_parameters,
                                         load_encoder, register_encoder)

__all__ = ["ChipEncoder", "EncoderError", "EncoderFactory", "build_encoder", "encoder_names",
           "encoder_parameters", "load_encoder", "register_encoder"]


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
