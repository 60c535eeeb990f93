"""The encoders' one exception. It lives in its own module so that `base` (the contract) and
`registry` (lookup by name) can both raise it without importing each other."""


class EncoderError(ValueError):
    """An encoder was asked for something it cannot do (bad parameters, bands, checkpoint...)."""
