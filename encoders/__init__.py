"""chipscout encoders: pure torch modules turning (B, C, H, W) chips into (B, D) vectors."""

from encoders.base import ChipEncoder, EncoderError, build_encoder, encoder_names, load_encoder

# base.py loads the families it knows lazily; the band-statistics baseline is tiny and has no
# optional dependency, so it registers here ("band-stats").
import encoders.baseline  # noqa: E402,F401  isort: skip

__all__ = ["ChipEncoder", "EncoderError", "build_encoder", "encoder_names", "load_encoder"]
