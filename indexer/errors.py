"""Exceptions a user can act on: the one hierarchy under `ChipscoutError`.

The CLI prints their message as one line and exits non-zero; the app shows it as one line.
`chipscout.encoders` is plain torch and imports nothing of ours, so its `EncoderError` stands
beside this hierarchy; the CLI and the app report both. This module imports nothing (no torch).
"""


class ChipscoutError(Exception):
    """Base class of every error chipscout reports to a user."""


# ----------------------------------------------------------------------------- sources
class SourceError(ChipscoutError):
    """A raster or STAC item cannot be read as asked (missing file, band, CRS...)."""


class StacSearchError(SourceError):
    """The STAC API cannot be searched as asked (unreachable, no such collection, bad parameters)."""


class NothingToIndexError(SourceError):
    """The search matched no items: nothing was read and no table was touched."""


class UnknownBandError(ChipscoutError, KeyError):
    """A band name that no sensor in the table knows."""

    def __str__(self) -> str:  # KeyError quotes its message; users want plain text
        return str(self.args[0])


class ProductFileError(SourceError):
    """A chip-level embedding file (GeoParquet) cannot be imported as asked: missing or ragged
    columns, NaNs, an unreadable URI. Raised before anything is written."""


class NothingToFitError(SourceError):
    """No source of a run gave a valid chip to fit the encoder on; `failures` says why, per source."""

    def __init__(self, message: str, failures: list[dict[str, str]]):
        super().__init__(message)
        self.failures = list(failures)


class ChipSpecError(ChipscoutError):
    """Chip size/stride or a grid that does not fit the raster."""


# ----------------------------------------------------------------------------- ingest
class IndexJobError(ChipscoutError):
    """An indexing option out of its range (nodata or cloud fraction, batch size, workers...)."""


class TransformError(ChipscoutError):
    """A transform that cannot be parsed, fitted on the given vectors, or applied to them."""


class ClusterError(ChipscoutError):
    """The cluster cannot run the job: unreachable scheduler, no workers, workers without the
    packages, GPU or storage access it needs, or a unit that kept killing its workers."""


# ----------------------------------------------------------------------------- store
class StoreError(ChipscoutError):
    """The LanceDB table is missing, incompatible or cannot be written."""


class IncompatibleTableError(StoreError):
    """Vectors of another encoder, band set or normalisation were about to be mixed."""


# ----------------------------------------------------------------------------- search
class QueryError(ChipscoutError):
    """A search parameter (chip id, k, filter value, vector) is invalid."""


# ----------------------------------------------------------------------------- seed sets
class LabelError(ChipscoutError):
    """A labelling session, label, import or export cannot be done as asked."""


class ExportError(LabelError):
    """A session cannot be exported as asked (empty session, unknown format, unwritable file...)."""


class GeoJSONImportError(LabelError):
    """A GeoJSON file cannot start a session: unreadable, in another CRS, or with a bad geometry."""


# ----------------------------------------------------------------------------- evaluation, app
class EvaluationError(ChipscoutError):
    """The folder, its images or the encoder cannot be evaluated as asked."""


class BasemapError(ChipscoutError, ValueError):
    """A basemap setting that is neither an XYZ tile template nor a style URL."""

