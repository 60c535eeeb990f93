"""Indexing on a Dask cluster, straight into the chip table's storage (local disk or object store).

The client cuts the work into units (a STAC item, or a block of a local raster's grid), the
workers read, embed and write each unit's chips as uncommitted Lance data files, and the client
commits the files of a batch of units in one atomic append. Readers never see part of a unit, a
crash loses at most the uncommitted batch, and a re-run skips by chip id what was committed. The
local runner (`ingest.local.run_local`) stays the default; both share one `run.IndexRun` (prologue,
admission, counters, epilogue) and make their rows with the same functions; this module keeps only
the cluster's loop and what runs on the workers.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
import torch

from chipscout.indexer import __version__
from chipscout.indexer.chips import Chip, ChipGrid
from chipscout.indexer.dask_client import dask_client, wants_cuda
from chipscout.indexer.errors import ChipscoutError, ClusterError, StoreError
from chipscout.indexer.ingest.embedding import Embedder
from chipscout.indexer.ingest.fitting import fit_transform
from chipscout.indexer.ingest.job import DEFAULT_MAX_CHIPS_PER_SOURCE, IndexJob
from chipscout.indexer.ingest.reading import (BatchEnd, ChipReader, Skipped, SourceFacts, SourceFailed,
                                              SourceOpened, chip_events, prefetch, read_valid, sample_draws)
from chipscout.indexer.ingest.rows import embed_batch_group
from chipscout.indexer.ingest.run import IndexRun, IndexSummary, progress_bar
from chipscout.indexer.ingest.transform import VectorTransform
from chipscout.indexer.sources import RasterSource, is_remote
from chipscout.indexer.ingest.fitted_state import bytes_to_tensors, state_digest, tensors_to_bytes
from chipscout.indexer.store import ChipStore

@dataclass(frozen=True)
class WorkerFacts:
    """What a worker process runs: checked before any work is handed out."""

    address: str
    host: str = ""
    pid: int = 0
    python: str = ""
    chipscout: str = ""
    lance: str = ""
    torch: str = ""
    gpus: int = 0
    error: str = ""


def _worker_facts() -> dict[str, Any]:
    """Runs on a worker: the versions of what a unit of work imports, and its GPUs."""
    import sys

    import torch as worker_torch

    import chipscout.indexer.ingest.local  # noqa: F401  (everything a unit needs: rasterio, lancedb, encoders)

    return {"host": socket.gethostname(), "pid": os.getpid(),
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "chipscout": __version__, "lance": ChipStore.data_file_format(), "torch": worker_torch.__version__,
            "gpus": worker_torch.cuda.device_count() if worker_torch.cuda.is_available() else 0}


def check_workers(client: Any, device: str | None = None) -> list[WorkerFacts]:
    """Every worker's facts; refuses workers that lack the packages, run other versions than
    this client (vectors and data files must be made by the same code) or lack a GPU asked for."""
    import sys

    answers = client.run(_worker_facts, on_error="return")
    if not answers:
        raise ClusterError("the cluster has no workers")
    facts, problems = [], []
    mine = {"python": f"{sys.version_info.major}.{sys.version_info.minor}", "chipscout": __version__,
            "lance": ChipStore.data_file_format(), "torch": torch.__version__}
    for address, answer in sorted(answers.items()):
        if isinstance(answer, BaseException):
            problems.append(f"{address} cannot run chipscout ({type(answer).__name__}: {answer}); "
                            f"install chipscout {__version__} with the same packages on every worker")
            continue
        fact = WorkerFacts(address=address, **answer)
        facts.append(fact)
        other = [f"{name} {getattr(fact, name)} (here {value})" for name, value in mine.items()
                 if getattr(fact, name) != value]
        if other:
            problems.append(f"{address} runs {', '.join(other)}")
        if wants_cuda(device) and fact.gpus == 0:
            problems.append(f"{address} has no CUDA GPU, and --device {device} was asked for")
    if problems:
        raise ClusterError("worker(s) not fit for this job: " + "; ".join(problems))
    return facts


def device_slots(facts: Sequence[WorkerFacts]) -> dict[str, int]:
    """Each worker's rank among the workers of its host: worker k of a host uses GPU k."""
    slots: dict[str, int] = {}
    for _, group in itertools.groupby(sorted(facts, key=lambda f: (f.host, f.address)), key=lambda f: f.host):
        for rank, fact in enumerate(group):
            slots[fact.address] = rank
    return slots


def worker_device(requested: str | None, slot: int) -> str:
    """The torch device of one worker process, so that each GPU serves one process.

    An explicit `cpu` or `cuda:N` is kept. Otherwise a worker whose CUDA_VISIBLE_DEVICES is set
    (dask-cuda gives every worker its own GPU first) uses `cuda:0`, and the k-th worker of a host
    without it uses GPU k (modulo the host's GPUs); without a GPU, the CPU.
    """
    if requested and requested not in ("cuda", "gpu"):
        return requested
    if not torch.cuda.is_available():
        if requested:
            raise ClusterError(f"worker {socket.gethostname()} has no CUDA GPU, and --device {requested} "
                               "was asked for")
        return "cpu"
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return "cuda:0"
    return f"cuda:{slot % torch.cuda.device_count()}"


# ----------------------------------------------------------------------------- units of work
@dataclass(frozen=True)
class WorkUnit:
    """One task: a source, or a block of its row-major grid positions [first, stop)."""

    source: RasterSource
    positions: tuple[int, int] | None = None

    @property
    def unit_id(self) -> str:
        if self.positions is None:
            return self.source.source_id
        return f"{self.source.source_id}@{self.positions[0]}-{self.positions[1]}"


@dataclass(frozen=True)
class UnitJob:
    """What every unit of one run needs, shipped with each task (small: no tensors)."""

    db_uri: str
    table_name: str
    storage_options: dict[str, str] | None
    state_sha256: str
    checkpoint: str | None
    bands: tuple[str, ...]
    grid: ChipGrid
    max_nodata_fraction: float
    max_cloud_fraction: float | None
    batch_size: int
    device: str | None
    slots: tuple[tuple[str, int], ...] = ()
    max_chips_per_source: int = DEFAULT_MAX_CHIPS_PER_SOURCE
    http_timeout_s: float = 60.0


@dataclass
class UnitResult:
    """What a worker did with one unit; `fragments` are written, not yet committed."""

    unit_id: str
    source: str
    worker: str = ""
    windows: int = 0
    chips_present: int = 0
    chips_new: int = 0
    chips_skipped_nodata: int = 0
    chips_skipped_cloud: int = 0
    chips_failed: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    fragments: list[Any] = field(default_factory=list)
    read_s: float = 0.0
    embed_s: float = 0.0
    write_s: float = 0.0


def plan_units(sources: Iterable[RasterSource], chip_reader: ChipReader, batch_size: int,
               tile_chips: int | None) -> Iterator[WorkUnit]:
    """Units for `sources`, lazily: a local raster is cut into blocks of about `tile_chips` grid
    positions (whole batch groups, so every chip shares its batch with the same chips as in a
    single-process run, and gets the same vector); a remote source (a STAC item) is one unit, so
    its header is read by the worker, not here. A source that cannot be opened here is one unit
    too: its worker reports the failure."""
    for source in sources:
        if tile_chips is None or any(is_remote(a.href) for a in source.bands):
            yield WorkUnit(source)
            continue
        try:
            reader, _, _ = chip_reader.open(source)
            with reader:
                count = len(chip_reader.grid.offsets(reader.grid.width, reader.grid.height))
        except Exception:  # reported by the worker, as the single-process path reports it
            yield WorkUnit(source)
            continue
        per_unit = max(1, round(tile_chips / batch_size)) * batch_size
        if count <= per_unit:
            yield WorkUnit(source)
            continue
        for first in range(0, count, per_unit):
            yield WorkUnit(source, (first, min(first + per_unit, count)))


# ----------------------------------------------------------------------------- on the workers
#: Encoders loaded in this worker process, by table, state digest and device: loaded once per
#: process, not once per task (a Clay checkpoint takes seconds to load). The few most recent are
#: kept, so a long-lived cluster indexing table after table does not pile models up.
_EMBEDDERS: dict[tuple[Any, ...], Embedder] = {}
_EMBEDDERS_LOCK = threading.Lock()
_EMBEDDERS_KEPT = 2


_MALLOC_TUNED = False


def _tune_malloc() -> None:
    """Undo, in this worker process, what Dask's default MALLOC_TRIM_THRESHOLD_=65536 does to
    torch: with any malloc threshold set, glibc stops adapting its mmap threshold, so every
    convolution chunk (MBs) is mmapped, page-faulted and unmapped again; RCF ran 2 to 3x slower
    in a worker than in a plain process. Set once per process: mmap threshold 32 MiB (glibc's
    maximum), trim threshold 64 MiB (freed memory above that still goes back to the system)."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to undo
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 2**20)
    libc.mallopt(m_trim_threshold, 64 * 2**20)


def _remember(cache: dict[Any, Embedder], key: Any, embedder: Embedder) -> Embedder:
    while len(cache) >= _EMBEDDERS_KEPT:
        cache.pop(next(iter(cache)))
    cache[key] = embedder
    return embedder


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):  # not inside a Dask worker (tests call units directly)
        return ""


def _worker_embedder(job: UnitJob, store: ChipStore) -> Embedder:
    device = worker_device(job.device, dict(job.slots).get(_worker_address(), 0))
    key = (job.db_uri, job.table_name, job.state_sha256, job.checkpoint, device)
    if store.config.state_sha256 != job.state_sha256:
        raise StoreError(f"table {job.table_name!r} in {job.db_uri} was replaced during the run "
                         "(its encoder state changed)")
    with _EMBEDDERS_LOCK:
        _tune_malloc()
        embedder = _EMBEDDERS.get(key)
        if embedder is None:
            embedder = _remember(_EMBEDDERS, key, Embedder.for_store(store, device, job.checkpoint))
        return embedder


def warm_worker(job: UnitJob) -> str:
    """Load the run's encoder into this worker's cache; its errors surface before any work."""
    store = ChipStore(job.db_uri, job.table_name, job.storage_options)
    embedder = _worker_embedder(job, store)
    return str(embedder.device)


def index_unit(unit: WorkUnit, job: UnitJob) -> UnitResult:
    """Runs on a worker: read, embed and write the chips of `unit` the table lacks.

    Chips already in the table (by id, at its latest version) are skipped before they are read,
    so a unit committed by an earlier run, or partly present, adds nothing twice. The rows are
    written as new data files and returned uncommitted: a task that dies or is run again leaves
    only unreferenced files behind.
    """
    started = time.perf_counter()
    store = ChipStore(job.db_uri, job.table_name, job.storage_options)
    embedder = _worker_embedder(job, store)
    source = unit.source
    result = UnitResult(unit.unit_id, source.location or source.source_id, worker=_worker_address())
    chip_reader = ChipReader(job.bands, job.grid, job.max_nodata_fraction, job.max_cloud_fraction,
                             job.max_chips_per_source, job.http_timeout_s)
    facts: dict[str, SourceFacts] = {}
    pending: list[Chip] = []
    rows: list[pa.Table] = []

    def chip_failed(chip: Chip, reason: str) -> None:
        result.chips_failed += 1
        result.failures.append({"source": facts[chip.source_id].location, "reason": f"chip {chip.chip_id}: {reason}"})

    def present_ids(source: RasterSource) -> set[str]:
        return store.chip_ids_of_source(source.source_id)

    # Reads run a batch group ahead in a thread, as in the single-process path: GDAL releases the
    # GIL, so a remote read waits while the previous group is embedded.
    events = chip_events([source], chip_reader, present_ids, job.batch_size, positions=unit.positions)
    for event in prefetch(events, depth=2 * job.batch_size):
        if isinstance(event, SourceOpened):
            facts[source.source_id] = event.facts
            result.windows, result.chips_present = event.windows, event.present
        elif isinstance(event, SourceFailed):
            result.chips_failed += len(pending) + event.unread
            pending.clear()  # a failed group is dropped whole: never part of a batch group written
            result.failures.append({"source": source.location or source.source_id, "reason": event.reason})
        elif isinstance(event, Skipped):
            if event.why == "cloud":
                result.chips_skipped_cloud += 1
            else:
                result.chips_skipped_nodata += 1
        elif isinstance(event, BatchEnd):
            embed_started = time.perf_counter()
            # The stretch as the table records it: every worker and every resumed run draw alike.
            for group_rows, _ in embed_batch_group(embedder, pending, source.sensor, facts, chip_failed,
                                                   store.config.thumbnail_stretch):
                rows.append(group_rows)
            result.embed_s += time.perf_counter() - embed_started
            pending = []
        else:
            pending.append(event)
    if rows:
        write_started = time.perf_counter()
        table = pa.concat_tables(rows)
        result.fragments = store.write_fragments(table)
        result.chips_new = table.num_rows
        result.write_s = time.perf_counter() - write_started
    result.read_s = time.perf_counter() - started - result.embed_s - result.write_s
    return result


@dataclass(frozen=True)
class SamplePlan:
    """One source's part of a fitting sample: grid positions to try, in order, and how many
    valid chips to keep at most."""

    source: RasterSource
    offsets: tuple[tuple[int, int], ...]
    take: int


def plan_sample(sources: Sequence[RasterSource], chip_reader: ChipReader, count: int,
                seed: int) -> list[SamplePlan]:
    """The draw of `reading.sample_chips`, without the reads: the same seeded positions of the
    same sources, so the chips the workers read (`read_sample`), put in source order and cut at
    `count`, are exactly the single-process sample, and so are the fitted kernels and transform.
    The client opens each source's header for its grid size."""
    return [SamplePlan(draw.source, tuple(draw.offsets), draw.per_source)
            for draw in sample_draws(sources, chip_reader, count, seed)]


def read_sample(plan: SamplePlan, bands: tuple[str, ...], grid: ChipGrid, max_nodata_fraction: float,
                max_cloud_fraction: float | None) -> tuple[list[Chip], float]:
    """Runs on a worker: the first `plan.take` valid chips at the planned positions (as
    `sample_chips` reads them: a failed read ends the source), and the source's GSD."""
    chip_reader = ChipReader(bands, grid, max_nodata_fraction, max_cloud_fraction)
    try:
        reader, projector, selected = chip_reader.open(plan.source)
    except Exception:
        return [], 0.0
    with reader:
        return read_valid(chip_reader, reader, projector, selected, plan.offsets, plan.take), reader.grid.gsd_m


def _sample_sizes(sample: tuple[list[Chip], float]) -> tuple[int, float]:
    return len(sample[0]), sample[1]


@dataclass(frozen=True)
class EncoderSpec:
    """An encoder before its table exists: what a worker needs to rebuild it (weights of a
    checkpoint encoder are loaded from the checkpoint path, never shipped)."""

    registered: str
    encoder_config: dict[str, Any]
    state: bytes | None
    normalization: Any
    band_wavelengths_um: tuple[float, ...]
    digest: str


#: Encoders of tables still being created (fitting a transform), by state digest and device.
_SPEC_EMBEDDERS: dict[tuple[str, str], Embedder] = {}


def embed_sample(samples: list[tuple[list[Chip], float]], picks: list[tuple[int, int]], gsd_m: float,
                 spec: EncoderSpec, device: str | None, slots: tuple[tuple[str, int], ...]) -> Any:
    """Runs on a worker: raw encoder vectors (before any transform) of the sample chips `picks`
    ((sample, chip) indexes into `samples`), embedded as one batch."""
    from chipscout.encoders.base import load_encoder
    worker_torch_device = worker_device(device, dict(slots).get(_worker_address(), 0))
    key = (spec.digest, worker_torch_device)
    with _EMBEDDERS_LOCK:
        _tune_malloc()
        embedder = _SPEC_EMBEDDERS.get(key)
        if embedder is None:
            state = bytes_to_tensors(spec.state) if spec.state is not None else None
            embedder = _remember(_SPEC_EMBEDDERS, key, Embedder(
                load_encoder(spec.registered, spec.encoder_config, state), spec.normalization,
                spec.band_wavelengths_um, torch.device(worker_torch_device)))
    return embedder.embed_raw([samples[i][0][j] for i, j in picks], gsd_m)


class _SampleRef:
    """Stands for one chip of a sample that stays on the workers (see `_ClusterRawEmbedder`)."""

    __slots__ = ("index", "gsd_m")

    def __init__(self, index: int, gsd_m: float):
        self.index, self.gsd_m = index, gsd_m


class _ClusterRawEmbedder:
    """Takes the embedder's place in `fitting.fit_transform`: its `embed_raw` gets runs
    of `_SampleRef`s and returns their raw vectors, embedded by the workers in the very batches
    `fit_transform` asks for (so the vectors, and the fitted transform, are the single-process
    ones). The first call submits every batch of its size ahead, so the batches run in parallel."""

    def __init__(self, client: Any, samples: list[Any], order: list[tuple[int, int]], spec: Any,
                 device: str | None, slots: tuple[tuple[str, int], ...], retries: int):
        self.client, self.samples, self.order = client, samples, order
        self.spec, self.device, self.slots, self.retries = spec, device, slots, retries
        self.batches: dict[tuple[int, int], Any] = {}

    gsd: list[float] = []

    def _submit(self, positions: Sequence[int], gsd_m: float) -> Any:
        picks = [self.order[p] for p in positions]
        involved = sorted({i for i, _ in picks})
        local = {i: n for n, i in enumerate(involved)}
        return self.client.submit(embed_sample, [self.samples[i] for i in involved],
                                  [(local[i], j) for i, j in picks], gsd_m, self.spec, self.device,
                                  self.slots, pure=False, retries=self.retries)

    def embed_raw(self, refs: Sequence[_SampleRef], gsd_m: float) -> Any:
        positions = [r.index for r in refs]
        start, stop = positions[0], positions[0] + len(positions)
        if positions != list(range(start, stop)):  # not a run: embed exactly what was asked
            return self._submit(positions, gsd_m).result()
        if not self.batches:
            for first in range(start, len(self.order), len(positions)):
                last = min(first + len(positions), len(self.order))
                self.batches[(first, last)] = self._submit(range(first, last), self.gsd_of_position(first))
        future = self.batches.pop((start, stop), None)
        if future is None or self.gsd_of_position(start) != gsd_m:
            future = self._submit(range(start, stop), gsd_m)
        return future.result()

    def gsd_of_position(self, position: int) -> float:
        return self.gsd[self.order[position][0]]


def _fit_transform_on_cluster(client: Any, embedder: Embedder, config: Any, encoder_name: str,
                              requested: str | None, pool: Sequence[RasterSource], chip_reader: ChipReader,
                              count: int, sampling: dict[str, Any], device: str | None,
                              slots: tuple[tuple[str, int], ...], retries: int) -> VectorTransform | None:
    """`fitting.fit_transform` with its sample read and embedded by the workers: the
    chips stay there, only their raw vectors come back to the client, which fits."""
    state = embedder.encoder.state_dict()
    spec = EncoderSpec(config.encoder, embedder.encoder.config(),
                       None if embedder.encoder.config().get("checkpoint") else tensors_to_bytes(state),
                       config.normalization, tuple(config.band_wavelengths_um), state_digest(state))
    remote = _ClusterRawEmbedder(client, [], [], None, device, slots, retries)

    def draw() -> list[_SampleRef]:
        samples = [client.submit(read_sample, plan, **sampling, pure=False, retries=retries)
                   for plan in plan_sample(pool, chip_reader, count, seed=1)]
        sizes = client.gather([client.submit(_sample_sizes, s, pure=False) for s in samples])
        remote.samples = samples
        remote.order = [(i, j) for i, (n, _) in enumerate(sizes) for j in range(n)][:count]
        remote.gsd = [gsd for _, gsd in sizes]
        remote.spec = client.scatter(spec, broadcast=True)
        return [_SampleRef(k, remote.gsd_of_position(k)) for k in range(len(remote.order))]

    try:
        return fit_transform(remote, requested, encoder_name, draw, lambda ref: ref.gsd_m)  # type: ignore[arg-type]
    finally:
        remote.samples, remote.batches = [], {}  # released: the sample chips leave the workers


def _reach_storage(db_uri: str, table_name: str, storage_options: dict[str, str] | None) -> bool:
    """Runs on a worker: can it list the database's tables (credentials, endpoint, bucket)?"""
    ChipStore(db_uri, table_name, storage_options).table_names()
    return True


# ----------------------------------------------------------------------------- the client
@dataclass
class ClusterSummary(IndexSummary):
    """An `IndexSummary` with what the cluster did."""

    workers: int = 0
    units: int = 0
    commits: int = 0
    commit_s: float = 0.0
    """Time spent in commits (all batches)."""
    fit_s: float = 0.0
    worker_read_s: float = 0.0
    worker_embed_s: float = 0.0
    worker_write_s: float = 0.0

    def add(self, unit: UnitResult) -> None:
        """Count what a worker did with one unit (its new chips count once committed)."""
        self.chips_present += unit.chips_present
        self.chips_skipped_nodata += unit.chips_skipped_nodata
        self.chips_skipped_cloud += unit.chips_skipped_cloud
        self.chips_failed += unit.chips_failed
        self.failures.extend(unit.failures)
        self.worker_read_s += unit.read_s
        self.worker_embed_s += unit.embed_s
        self.worker_write_s += unit.write_s


def _first_error(answers: dict[str, Any]) -> list[str]:
    return [f"{address}: {type(answer).__name__}: {answer}" for address, answer in sorted(answers.items())
            if isinstance(answer, BaseException)]


def index_on_cluster(sources: Sequence[RasterSource] | Iterable[RasterSource], **options: Any) -> ClusterSummary:
    """`run_on_cluster` with the job's options as keywords (`IndexJob.from_options`)."""
    return run_on_cluster(sources, IndexJob.from_options(**options))


def run_on_cluster(sources: Sequence[RasterSource] | Iterable[RasterSource], job: IndexJob) -> ClusterSummary:
    """`local.run_local` on a Dask cluster: the same table, chip by chip and vector by vector.

    Give a running `job.cluster.client`, or `cluster="local:N"` / `scheduler="tcp://HOST:PORT"`.
    Every worker must run the same chipscout, lance and torch as this client and reach the table's
    storage (for a local `db_uri`: a filesystem every worker shares). The commits of the run
    each hold whole units, at least `commit_every` chips where the work allows; a re-run skips
    what was committed. `tile_chips` sizes the units of local rasters (None: one per source).
    Not supported here: encoders that keep patch vectors (`--pooling patch`).
    """
    options = job.cluster
    if options.client is None:
        ChipStore(job.db_uri, job.table_name, job.storage_options).exists()  # bucket, credentials: before a cluster starts
        with dask_client(options.cluster, options.scheduler, device=job.device) as own:
            return run_on_cluster(sources, replace(
                job, cluster=replace(options, client=own),
                run_request={**(job.run_request or {}), "cluster": options.cluster or options.scheduler}))
    return _ClusterLoop(IndexRun(sources, job), options.client).index()


class _ClusterLoop:
    """The cluster's part of a run: workers checked, fitting on the workers, units handed out
    and their data files committed in batches."""

    def __init__(self, run: IndexRun, client: Any):
        self.run, self.client, self.job = run, client, run.job
        self.retries = self.job.cluster.retries
        self.slots: tuple[tuple[str, int], ...] = ()
        self.in_flight: dict[str, tuple[WorkUnit, Any]] = {}  # by task key: the unit and its future

    def index(self) -> ClusterSummary:
        run, job, client = self.run, self.job, self.client
        # Everything that can be checked is checked before anything is written or read.
        facts = check_workers(client, job.device)
        store = run.open_store()
        store.exists()  # the store's own errors (bucket, credentials) before the workers'
        unreachable = _first_error(client.run(_reach_storage, store.db_uri, job.table_name,
                                              job.storage_options, on_error="return"))
        if unreachable:
            raise ClusterError(f"worker(s) cannot reach the database {job.db_uri}: " + "; ".join(unreachable))
        # The client only fits and checks: the workers embed.
        summary: ClusterSummary = run.resolve_encoder("cpu", torch.device("cpu"), ClusterSummary)  # type: ignore[assignment]
        summary.workers = len(facts)
        if run.embedder.keeps_patches:
            raise ChipscoutError("patch vectors (--pooling patch) are not written by cluster runs yet; "
                                 "index without --cluster/--scheduler, or with another pooling")
        run.start(transform=job.transform, transform_sample_chips=job.transform_sample_chips,
                  device=job.device, workers=[f.address for f in facts], tile_chips=job.cluster.tile_chips)
        with run.recorded():
            try:
                self.slots = tuple(sorted(device_slots(facts).items()))
                self._fit()
                summary.fit_s = run.fit_s
                if not store.exists():
                    run.create_table()
                self._units(self._warm_workers(facts), len(facts), summary)
            except BaseException:
                if self.in_flight:
                    client.cancel([future for _, future in self.in_flight.values()])
                raise
        return summary

    def _fit(self) -> None:
        run, job, client, retries = self.run, self.job, self.client, self.retries
        sampling = dict(bands=tuple(run.band_names), grid=job.grid,
                        max_nodata_fraction=job.max_nodata_fraction, max_cloud_fraction=job.max_cloud_fraction)
        fit_reader = ChipReader(run.band_names, job.grid, job.max_nodata_fraction, job.max_cloud_fraction,
                                 job.max_chips_per_source, job.http_timeout_s)

        def encoder_sample(pool: Sequence[RasterSource]) -> list[Chip]:
            # The workers read the sample (the single-process draw); the client fits on it.
            samples = [client.submit(read_sample, plan, **sampling, pure=False, retries=retries)
                       for plan in plan_sample(pool, fit_reader, job.fit_sample_chips, seed=0)]
            return [chip for chips, _ in client.gather(samples) for chip in chips][:job.fit_sample_chips]

        run.fit(encoder_sample, lambda pool: _fit_transform_on_cluster(
            client, run.embedder, run.config, job.encoder.name, job.transform, pool, fit_reader,
            job.transform_sample_chips, sampling, job.device, self.slots, retries),
            refused=fit_reader.refused)

    def _warm_workers(self, facts: Sequence[WorkerFacts]) -> UnitJob:
        """What every unit needs; every worker loads the encoder now, so that a missing GPU or
        checkpoint fails here, not mid-run."""
        run, job, client, store = self.run, self.job, self.client, self.run.store
        unit_job = UnitJob(
            db_uri=store.db_uri, table_name=job.table_name, storage_options=job.storage_options,
            state_sha256=store.config.state_sha256, checkpoint=job.encoder.params.get("checkpoint"),
            bands=tuple(run.band_names), grid=job.grid, max_nodata_fraction=job.max_nodata_fraction,
            max_cloud_fraction=job.max_cloud_fraction, batch_size=job.batch_size, device=job.device,
            slots=self.slots, max_chips_per_source=job.max_chips_per_source, http_timeout_s=job.http_timeout_s)
        warm = [client.submit(warm_worker, unit_job, workers=[f.address], allow_other_workers=True,
                              pure=False) for f in facts]
        try:
            client.gather(warm)
        except Exception as err:
            raise ClusterError(f"a worker cannot load the encoder of table {job.table_name!r} "
                               f"or open it at {job.db_uri}: {type(err).__name__}: {err}") from err
        finally:
            del warm
        return unit_job

    def _units(self, unit_job: UnitJob, workers: int, summary: ClusterSummary) -> None:
        """Hand out the units, a few per worker ahead, and commit their files in batches."""
        from distributed import as_completed

        run, job, client, store = self.run, self.job, self.client, self.run.store
        chip_reader = ChipReader(run.band_names, job.grid, job.max_nodata_fraction, job.max_cloud_fraction,
                                 job.max_chips_per_source, job.http_timeout_s)
        units = plan_units(run.admitted(run.stream()), chip_reader, job.batch_size, job.cluster.tile_chips)
        bar = progress_bar(job.progress)
        waiting: list[UnitResult] = []
        read_version = store.version
        run_key = uuid.uuid4().hex[:12]

        def submit_next(done: Any) -> bool:
            unit = next(units, None)
            if unit is None:
                return False
            key = f"chipscout-unit-{run_key}-{summary.units}"
            summary.units += 1
            future = client.submit(index_unit, unit, unit_job, key=key, pure=False, retries=self.retries)
            self.in_flight[key] = (unit, future)
            done.add(future)
            return True

        def commit() -> None:
            nonlocal read_version
            fragments = [f for r in waiting for f in r.fragments]
            if fragments:
                commit_started = time.perf_counter()
                read_version = store.commit_fragments(fragments, read_version)
                summary.commit_s += time.perf_counter() - commit_started
                summary.commits += 1
            summary.chips_new += sum(r.chips_new for r in waiting)
            waiting.clear()

        done = as_completed()
        for _ in range(2 * workers + 2):  # a few units queued per worker, the stream drawn lazily
            if not submit_next(done):
                break
        for future in done:
            unit, _ = self.in_flight.pop(future.key)
            result = self._result(unit, future)
            future.release()
            summary.add(result)
            bar.total = (bar.total or 0) + result.windows
            bar.update(result.windows)
            waiting.append(result)
            if sum(r.chips_new for r in waiting) >= job.commit_every:
                commit()
            submit_next(done)
        commit()
        bar.close()

    def _result(self, unit: WorkUnit, future: Any) -> UnitResult:
        from distributed import KilledWorker

        try:
            return future.result()
        except KilledWorker as err:
            raise ClusterError(f"unit {unit.unit_id} ({unit.source.location}) was running on "
                               f"workers that died, too often to try again: {err}") from err
        except ChipscoutError:
            raise
        except Exception as err:  # a worker's own failure, after `retries` more attempts
            raise ClusterError(f"unit {unit.unit_id} ({unit.source.location}) failed on the "
                               f"cluster {self.retries + 1} time(s): {type(err).__name__}: {err}") from err
