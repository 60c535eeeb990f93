"""`IndexJob`: every option of one indexing run, held once and validated once.

Both runners (`local.run_local`, `cluster.run_on_cluster`) take one; the CLI builds one from its
flags, and `index_sources(sources, **options)` from keywords.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from chipscout.indexer.chips import ChipGrid
from chipscout.indexer.errors import IndexJobError

#: Chips per unit of a local raster, rounded to whole batch groups: small enough to spread one
#: big scene over many workers, big enough that a unit's fixed costs (opening the raster, looking
#: up stored ids, writing a data file) stay small beside reading and embedding.
DEFAULT_TILE_CHIPS = 512
#: Times a unit is run again after raising (a worker that dies is handled by the scheduler:
#: its tasks move to other workers, up to `distributed.scheduler.allowed-failures` times).
DEFAULT_RETRIES = 2
#: Chips one source may make before it is refused, on its header alone (a small sparse file can
#: declare billions of pixels); a 10 m Sentinel-2 tile at 32 px chips, stride 16, makes ~470,000.
DEFAULT_MAX_CHIPS_PER_SOURCE = 1_000_000


@dataclass(frozen=True)
class EncoderChoice:
    name: str = "rcf"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusterOptions:
    """Where and how a cluster run runs: a running `client`, or `cluster="local[:N]"` /
    `scheduler="tcp://HOST:PORT"`; `tile_chips` sizes the units of local rasters (None: one per
    source), `retries` is how often a failed unit runs again."""

    cluster: str | None = None
    scheduler: str | None = None
    client: Any = None
    tile_chips: int | None = DEFAULT_TILE_CHIPS
    retries: int = DEFAULT_RETRIES

    @property
    def wanted(self) -> bool:
        """Whether the job runs on a cluster at all."""
        return bool(self.client is not None or self.cluster or self.scheduler)


@dataclass(frozen=True)
class IndexJob:
    """What to index into, with what encoder and grid, and how (see `index_sources`)."""

    db_uri: str
    table_name: str
    encoder: EncoderChoice = EncoderChoice()
    grid: ChipGrid = ChipGrid(128, 128)
    bands: Sequence[str] | None = None
    max_nodata_fraction: float = 0.5
    max_cloud_fraction: float | None = None
    batch_size: int = 32
    commit_every: int = 512
    fit_sample_chips: int = 256
    transform: str | None = "default"
    transform_sample_chips: int = 2048
    reuse_fit_vectors: bool = True
    """The local runner stores the raw vectors the transform fit embedded for its sample chips
    instead of embedding those chips again in the main pass (a small table's sample is the whole
    table). False embeds them twice, the old path, kept to compare against (tests, bench)."""
    device: str | None = None
    progress: bool = True
    storage_options: dict[str, str] | None = None
    read_workers: int = 1
    max_chips_per_source: int = DEFAULT_MAX_CHIPS_PER_SOURCE
    http_timeout_s: float = 60.0
    """Each HTTP request of a remote raster read ends within this (GDAL_HTTP_TIMEOUT)."""
    """A source whose grid makes more chips is refused before any pixel is read."""
    run_request: dict[str, Any] | None = None
    cluster: ClusterOptions = ClusterOptions()

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_nodata_fraction <= 1.0:
            raise IndexJobError(f"max nodata fraction must be within 0..1, got {self.max_nodata_fraction}")
        if self.max_cloud_fraction is not None and not 0.0 <= self.max_cloud_fraction <= 1.0:
            raise IndexJobError(f"max cloud fraction must be within 0..1, got {self.max_cloud_fraction}")
        if self.batch_size <= 0 or self.commit_every <= 0:
            raise IndexJobError("batch size and commit size must be positive")
        if isinstance(self.max_chips_per_source, bool) or not isinstance(self.max_chips_per_source, int) \
                or self.max_chips_per_source < 1:
            raise IndexJobError(f"max chips per source must be a positive integer, got {self.max_chips_per_source!r}")
        if not (isinstance(self.http_timeout_s, (int, float)) and self.http_timeout_s > 0):
            raise IndexJobError(f"the network timeout must be a positive number of seconds, got {self.http_timeout_s!r}")
        if self.read_workers < 1:
            raise IndexJobError(f"read workers must be at least 1, got {self.read_workers}")
        if self.cluster.tile_chips is not None and self.cluster.tile_chips <= 0:
            raise IndexJobError(f"chips per unit must be positive, got {self.cluster.tile_chips}")

    @classmethod
    def from_options(cls, **options: Any) -> IndexJob:
        """A job from flat keywords: the fields above, plus those of `ClusterOptions`."""
        cluster = options.pop("cluster", None)
        flat = {f.name: options.pop(f.name) for f in fields(ClusterOptions) if f.name in options}
        if not isinstance(cluster, ClusterOptions):
            cluster = ClusterOptions(cluster=cluster, **flat)
        elif flat:
            raise TypeError(f"give {', '.join(sorted(flat))} inside cluster=ClusterOptions(...)")
        unknown = set(options) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown indexing option(s): {', '.join(sorted(unknown))}")
        return cls(**options, cluster=cluster)
