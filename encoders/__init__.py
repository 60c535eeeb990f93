"""chipscout encoders: pure torch modules turning (B, C, H, W) chips into (B, D) vectors.

Importing the package imports every family, each of which registers itself in `registry`, so
`build_encoder(name)` knows every built-in name without lazy loading.
"""

from chipscout.encoders import baseline, clay, raster_embedding, rcf  # noqa: F401  (the families register themselves)
from chipscout.encoders.base import ChipEncoder, EncoderError
from chipscout.encoders.registry import (build_encoder, encoder_names, encoder_parameters, load_encoder,
                                         register_encoder)

__all__ = ["ChipEncoder", "EncoderError", "build_encoder", "encoder_names", "encoder_parameters",
           "load_encoder", "register_encoder"]
