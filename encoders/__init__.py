"""chipscout encoders: pure torch modules turning (B, C, H, W) chips into (B, D) vectors."""

from chipscout.encoders.base import ChipEncoder, EncoderError, build_encoder, encoder_names, load_encoder

__all__ = ["ChipEncoder", "EncoderError", "build_encoder", "encoder_names", "load_encoder"]
