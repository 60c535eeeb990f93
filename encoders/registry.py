"""The encoder families by name: each family module registers its factories here when it is
imported, and `chipscout.encoders` imports every family eagerly, so the registry is complete as
soon as the package is. Tables record the registered name, so an index's encoder is rebuilt from
`load_encoder(name, config, state)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from chipscout.encoders.errors import EncoderError

if TYPE_CHECKING:  # annotations only: base re-exports this module, so it is not imported here
    import torch

    from chipscout.encoders.base import ChipEncoder

EncoderFactory = Callable[..., "ChipEncoder"]
_REGISTRY: dict[str, EncoderFactory] = {}


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Register a factory under `name` so `build_encoder(name, **params)` finds it."""

    def decorate(factory: EncoderFactory) -> EncoderFactory:
        _REGISTRY[name] = factory
        return factory

    return decorate


def encoder_names() -> list[str]:
    return sorted(_REGISTRY)


def _factory(name: str) -> EncoderFactory:
    if name not in _REGISTRY:
        raise EncoderError(f"unknown encoder {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def encoder_parameters(name: str) -> set[str]:
    """Constructor parameters the encoder registered as `name` accepts."""
    return set(inspect.signature(_factory(name)).parameters)


def build_encoder(name: str, **params: Any) -> ChipEncoder:
    """A fresh encoder of the registered kind `name` with constructor `params`."""
    return _factory(name)(**params)


def load_encoder(registered_name: str, config: dict[str, Any],
                 state: dict[str, torch.Tensor] | None) -> ChipEncoder:
    """Rebuild the encoder a table was written with, bit for bit."""
    encoder = build_encoder(registered_name, **config)
    if state is not None:
        encoder.load_state_dict(state, strict=True)
    return encoder
