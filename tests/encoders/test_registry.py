"""The encoder registry: complete as soon as `chipscout.encoders` is imported, one set of names
wherever they are imported from."""

from __future__ import annotations

import subprocess
import sys

import pytest

import chipscout.encoders
from chipscout.encoders import base, registry
from chipscout.encoders.base import ChipEncoder, EncoderError

BUILT_IN = ["aef", "band-stats", "clay-tiny", "clay-v1-base", "clay-v1.5-large", "raster-embedding", "rcf",
            "tessera"]


def test_every_family_is_registered_on_first_import():
    code = "from chipscout.encoders.registry import encoder_names; print(','.join(encoder_names()))"
    names = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert names.strip().split(",") == BUILT_IN


def test_the_public_names_are_one_set_of_objects():
    for name in ("build_encoder", "encoder_names", "encoder_parameters", "load_encoder", "register_encoder"):
        assert getattr(chipscout.encoders, name) is getattr(registry, name) is getattr(base, name)
    assert chipscout.encoders.EncoderError is EncoderError is registry.EncoderError


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(EncoderError, match="unknown encoder 'nope'; known: aef, band-stats, clay-tiny"):
        registry.build_encoder("nope")
    with pytest.raises(EncoderError, match="unknown encoder"):
        registry.encoder_parameters("nope")


def test_a_registered_factory_is_built_and_reloaded_by_name(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    built = registry.build_encoder("band-stats", in_channels=4)

    @registry.register_encoder("copy-of-band-stats")
    def make(**params) -> ChipEncoder:
        return type(built)(**params)

    assert "copy-of-band-stats" in registry.encoder_names()
    assert registry.encoder_parameters("copy-of-band-stats") == {"params"}
    again = registry.load_encoder("copy-of-band-stats", built.config(), built.state_dict())
    assert again.config() == built.config()
