"""Exceptions a user can act on. The CLI prints their message as one line and exits non-zero."""


class ChipscoutError(Exception):
    """Base class of every error chipscout reports to a user."""


class SourceError(ChipscoutError):
    """A raster or STAC item cannot be read as asked (missing file, band, CRS...)."""


class ChipSpecError(ChipscoutError):
    """Chip size/stride or a grid that does not fit the raster."""


class StoreError(ChipscoutError):
    """The LanceDB table is missing, incompatible or cannot be written."""


class IncompatibleTableError(StoreError):
    """Vectors of another encoder, band set or normalisation were about to be mixed."""


class QueryError(ChipscoutError):
    """A search parameter (chip id, k, filter value, vector) is invalid."""
