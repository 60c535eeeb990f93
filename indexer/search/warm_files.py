"""A local copy of what a warm searcher holds of a table on object storage (s3://, gs://, az://),
so that a restarted process warms up from local files instead of downloading the table again.

One folder per table version, `<root>/<hash of the table's URI>/v<version>/`: the filter columns,
the vectors at the tier held, the sketch's arrays (`.npy` each), the result columns (Arrow IPC,
memory-mapped when read back) and `meta.json`, which names the version (its commit time too, so
a re-created table never matches an old copy), the columns and the budget it was held under,
and each file's size and CRC-32. Written in a temporary folder renamed into place; only the
latest copy of each table is kept. A copy that does not match or does not check out is a log
line and a normal warm-up, never an answer from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from chipscout.indexer.paths import cache_dir
from chipscout.indexer.search.filters import FilterColumns
from chipscout.indexer.search.warm import (BinarySketch, DiskVectors, Int8Vectors, MemoryVectors, VectorSearcher,
                                           WarmCache, WarmPlan)
from chipscout.indexer.store.indexes import IndexPolicy

log = logging.getLogger(__name__)

#: Where the copies go: a folder, or `off` to keep none.
ENVIRONMENT = "CHIPSCOUT_WARM_FILES"
FORMAT = 1
_TIERS: dict[str, type[MemoryVectors]] = {"float32": MemoryVectors, "float16": MemoryVectors,
                                          "int8": Int8Vectors, "disk": DiskVectors}


def default_root() -> Path | None:
    """`$CHIPSCOUT_WARM_FILES` (`off`: no copies), else `<cache>/warm` (`$CHIPSCOUT_CACHE`, else
    `$XDG_CACHE_HOME/chipscout`)."""
    chosen = os.environ.get(ENVIRONMENT, "").strip()
    if chosen.lower() in ("off", "0", "none", "false"):
        return None
    return Path(chosen) if chosen else cache_dir() / "warm"


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


class WarmFiles:
    """The local copies under `root`, one folder per table (its latest warmed version)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def table_folder(self, store) -> Path:
        key = hashlib.sha256(f"{store.lance_uri}\n{store.table_name}".encode()).hexdigest()[:24]
        return self.root / key

    # ------------------------------------------------------------------ writing
    def save(self, store, cache: WarmCache, want: dict[str, Any]) -> Path | None:
        """Write `cache` (of `store`'s table; made as `want` says, `wanted`) as the table's copy;
        its folder, or None when it could not be written (a log line; the cache is unaffected)."""
        folder = self.table_folder(store)
        staging = folder / f".tmp-{uuid.uuid4().hex}"
        try:
            needed = cache.nbytes + (1 << 20)
            folder.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(folder).free < 2 * needed:
                log.warning("warm files: not enough free space in %s for a %d-byte copy; none kept", folder, needed)
                return None
            staging.mkdir()
            meta = {"want": want, **self._write(staging, cache), "written": time.time()}
            (staging / "meta.json").write_text(json.dumps(meta))
            target = folder / f"v{cache.version}"
            if target.exists():  # a copy made under other settings: replace it
                shutil.rmtree(target)
            os.rename(staging, target)
            for other in folder.iterdir():  # keep only this table's latest copy
                writing = other.name.startswith(".tmp-") and time.time() - other.stat().st_mtime < 3600
                if other != target and not writing:  # (another process's copy being written: left)
                    shutil.rmtree(other, ignore_errors=True)
            return target
        except (OSError, TypeError, ValueError) as err:
            log.warning("warm files: cannot keep a local copy of table %r in %s: %s", store.table_name, folder, err)
            shutil.rmtree(staging, ignore_errors=True)
            return None

    def _write(self, staging: Path, cache: WarmCache) -> dict[str, Any]:
        files: dict[str, dict[str, int]] = {}

        def put(name: str, array: np.ndarray) -> None:
            path = staging / f"{name}.npy"
            np.save(path, np.ascontiguousarray(array), allow_pickle=False)
            files[path.name] = {"bytes": path.stat().st_size, "crc32": _crc32(path)}

        for name, array in cache.filters.arrays().items():
            put(f"filters.{name}", array)
        vectors = None
        if cache.vectors is not None:
            vectors = {"tier": cache.vectors.tier, "scalars": {}}
            for name, value in vars(cache.vectors).items():
                if isinstance(value, np.ndarray) and name != "row_ids":  # the row ids are the filters'
                    put(f"vectors.{name}", value)
                elif isinstance(value, (int, float)) and not isinstance(value, bool) and name != "version":
                    vectors["scalars"][name] = value
        sketch = None
        if cache.sketch is not None:
            sketch = {"scalars": {}, "lists": {}}
            for name, value in vars(cache.sketch).items():
                if isinstance(value, np.ndarray):
                    put(f"sketch.{name}", value)
                elif isinstance(value, list) and all(isinstance(v, np.ndarray) for v in value):
                    for i, part in enumerate(value):
                        put(f"sketch.{name}.{i}", part)
                    sketch["lists"][name] = len(value)
                elif isinstance(value, (int, float, str)):
                    sketch["scalars"][name] = value
                elif not isinstance(value, (FilterColumns, ThreadPoolExecutor)):
                    raise TypeError(f"the sketch's {name!r} ({type(value).__name__}) has no file form")
        records = None
        if cache.records.num_columns:
            path = staging / "records.arrow"
            with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, cache.records.schema) as writer:
                writer.write_table(cache.records)
            files[path.name] = {"bytes": path.stat().st_size, "crc32": _crc32(path)}
            records = path.name
        return {"rows": cache.records.num_rows, "source_names": cache.filters.source_names,
                "vectors": vectors, "sketch": sketch, "records": records, "files": files,
                "plan": asdict(cache.plan) if cache.plan is not None else None}

    # ------------------------------------------------------------------ reading
    @staticmethod
    def wanted(store, version: int, columns: Sequence[str] | None, policy: IndexPolicy) -> dict[str, Any]:
        """What a copy must have been made of and under to stand in for a warm-up of `store`'s
        table at `version` keeping `columns` under `policy` (reads the table's version list)."""
        return {"format": FORMAT, "table": store.version_stamp(version), "columns": list(columns or ()),
                "policy": {name: getattr(policy, name) for name in
                           ("warm_cache_bytes", "exact_cache_bytes", "sketch_min_rows", "sketch_bits")}}

    def load(self, store, version: int, want: dict[str, Any]) -> WarmCache | None:
        """The warm cache of `store`'s table at `version` from its copy when it was made as
        `want` says (`wanted`), else None (a corrupt or partial copy: a log line; removed)."""
        folder = self.table_folder(store) / f"v{version}"
        meta_path = folder / "meta.json"
        if not meta_path.exists():
            return None
        started = time.perf_counter()
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("want") != want:
                return None  # made of another table, version or budget: a warm-up replaces it
            return self._read(store, folder, meta, started)
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            log.warning("warm files: the local copy in %s is unusable (%s); warming up from the table",
                        folder, err)
            shutil.rmtree(folder, ignore_errors=True)
            return None

    def load_older(self, store, version: int, want: dict[str, Any]) -> WarmCache | None:
        """The table's copy of a version before `version`, made under the settings of `want` (its
        columns and budget) and of a version the table still has, with the same commit time (the
        table was not re-created since); None when there is none. The caller absorbs what was
        appended since (`VectorSearcher._absorb`), or warms up from the table."""
        folder = self.table_folder(store)
        older = sorted((int(f.name[1:]) for f in folder.glob("v*") if f.name[1:].isdigit()
                        and int(f.name[1:]) < version), reverse=True) if folder.is_dir() else []
        for held in older[:1]:  # only the latest copy is kept
            try:
                same = {**want, "table": store.version_stamp(held)}
            except Exception as err:  # noqa: BLE001 (the version may be gone: then there is nothing to absorb into)
                log.info("warm files: version %d of table %r is not readable (%s)", held, store.table_name, err)
                return None
            return self.load(store, held, same)
        return None

    def _read(self, store, folder: Path, meta: dict[str, Any], started: float) -> WarmCache:
        for name, expected in meta["files"].items():
            path = folder / name
            if path.stat().st_size != expected["bytes"] or _crc32(path) != expected["crc32"]:
                raise ValueError(f"{name} does not match its checksum")

        def get(name: str) -> np.ndarray:
            return np.load(folder / f"{name}.npy", allow_pickle=False)

        version = meta["want"]["table"]["version"]
        filters = FilterColumns.from_arrays(
            version, {name[len("filters."):-len(".npy")]: get(name[:-len(".npy")])
                      for name in meta["files"] if name.startswith("filters.")}, meta["source_names"])
        rows = len(filters.row_ids)
        if rows != meta["rows"]:
            raise ValueError(f"{rows} rows of filter columns, {meta['rows']} expected")
        vectors = None
        if meta["vectors"] is not None:
            tier = meta["vectors"]["tier"]
            vectors = _TIERS[tier].__new__(_TIERS[tier])
            vectors.version, vectors.row_ids = version, filters.row_ids
            for name in meta["files"]:
                if name.startswith("vectors."):
                    setattr(vectors, name[len("vectors."):-len(".npy")], get(name[:-len(".npy")]))
            for name, value in meta["vectors"]["scalars"].items():
                setattr(vectors, name, value)
            if tier in ("int8", "disk"):
                vectors.store = store  # they read the final scores from the table
            if tier != "disk" and len(vectors.vectors) != rows:
                raise ValueError(f"{len(vectors.vectors)} vectors for {rows} rows")
        sketch = None
        if meta["sketch"] is not None:
            sketch = BinarySketch.__new__(BinarySketch)
            for name, value in meta["sketch"]["scalars"].items():
                setattr(sketch, name, value)
            for name in meta["files"]:
                stem = name[:-len(".npy")]
                if stem.startswith("sketch.") and stem.count(".") == 1:
                    setattr(sketch, stem[len("sketch."):], get(stem))
            for name, count in meta["sketch"]["lists"].items():
                setattr(sketch, name, [get(f"sketch.{name}.{i}") for i in range(count)])
            if len(sketch.order) != rows or any(len(w) != rows for w in sketch.words):
                raise ValueError("the sketch's arrays do not cover the rows")
            sketch.filters = filters.reordered(sketch.order)
            sketch._pool = ThreadPoolExecutor(sketch._threads)
        if meta["records"]:
            # Memory-mapped: the result columns are paged in from the local file as queries read them.
            with pa.memory_map(str(folder / meta["records"])) as source:
                records = ipc.open_file(source).read_all()
            if records.num_rows != rows:
                raise ValueError(f"{records.num_rows} result rows for {rows} rows")
        else:
            records = pa.table({"row": pa.nulls(rows)}).select([])
        plan = WarmPlan(**meta["plan"]) if meta["plan"] is not None else None
        return WarmCache(version, records, filters, vectors, time.perf_counter() - started, sketch, plan)


class LocalCopySearcher(VectorSearcher):
    """A `VectorSearcher` of a table on object storage that warms up from a local copy of what it
    held before (`WarmFiles`) when the table has not changed since, or from the copy of an older
    version and the rows appended since (read alone, as a running engine absorbs an append), and
    keeps one after each warm-up that read the table."""

    def __init__(self, store, policy: IndexPolicy, files: WarmFiles):
        super().__init__(store, policy)
        self.files = files
        self.last_copy: dict[str, Any] = {}
        """How the last warm-up went: `loaded` from the copy, or `saved` one (its folder or None)."""

    def _load_warm(self, version: int) -> WarmCache:
        want = self.files.wanted(self.store, version, self._warm_columns, self.policy)
        cache = self.files.load(self.store, version, want)
        if cache is not None:
            self.last_copy = {"loaded": True, "folder": str(self.files.table_folder(self.store))}
            return cache
        older = self.files.load_older(self.store, version, want)
        cache = self._absorb(older, version) if older is not None else None
        del older
        absorbed = cache is not None
        if cache is None:
            cache = super()._load_warm(version)
        saved = self.files.save(self.store, cache, want)
        self.last_copy = {"loaded": False, "absorbed": cache.absorbed_rows if absorbed else None,
                          "saved": str(saved) if saved else None}
        return cache


def searcher_for(store, policy: IndexPolicy, root: Path | str | None | bool = True) -> VectorSearcher:
    """The searcher of `store`: one keeping a local copy of its warm cache when the table is on
    object storage and copies are on (`root`: True for `default_root()`, a folder, or
    None/False for none); a plain `VectorSearcher` for a local table, whose own files are as
    near as a copy would be."""
    folder = default_root() if root is True else (Path(root) if root else None)
    if folder is None or store.is_local:
        return VectorSearcher(store, policy)
    return LocalCopySearcher(store, policy, WarmFiles(folder))
