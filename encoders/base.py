"""The contract every chipscout encoder meets, and the registry that builds them by name.

Encoders are plain torch modules: they see scaled pixels, band wavelengths and optional
per-chip metadata, and return one float32 vector per chip. They know nothing of storage,
STAC or files, so an index's encoder can be rebuilt anywhere from `config()` + `state_dict()`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn


class EncoderError(ValueError):
    """An encoder was asked for something it cannot do (bad parameters, bands, checkpoint...)."""


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


EncoderFactory = Callable[..., ChipEncoder]
_REGISTRY: dict[str, EncoderFactory] = {}


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Register a factory under `name` so `build_encoder(name, **params)` finds it."""

    def decorate(factory: EncoderFactory) -> EncoderFactory:
        _REGISTRY[name] = factory
        return factory

    return decorate


def encoder_names() -> list[str]:
    _load_builtin_encoders()
    return sorted(_REGISTRY)


def encoder_parameters(name: str) -> set[str]:
    """Constructor parameters the encoder registered as `name` accepts."""
    import inspect

    _load_builtin_encoders()
    if name not in _REGISTRY:
        raise EncoderError(f"unknown encoder {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return set(inspect.signature(_REGISTRY[name]).parameters)


def build_encoder(name: str, **params: Any) -> ChipEncoder:
    """A fresh encoder of the registered kind `name` with constructor `params`."""
    _load_builtin_encoders()
    if name not in _REGISTRY:
        raise EncoderError(f"unknown encoder {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**params)


def load_encoder(registered_name: str, config: dict[str, Any],
                 state: dict[str, torch.Tensor] | None) -> ChipEncoder:
    """Rebuild the encoder a table was written with, bit for bit."""
    encoder = build_encoder(registered_name, **config)
    if state is not None:
        encoder.load_state_dict(state, strict=True)
    return encoder


def _load_builtin_encoders() -> None:
    # Imported lazily: the family modules import this one to register themselves.
    import chipscout.encoders.baseline  # noqa: F401
    import chipscout.encoders.clay  # noqa: F401
    import chipscout.encoders.rcf  # noqa: F401
