"""The run log of a chip table: what each indexing run (or restore, or cleanup) was asked to do
and what happened, kept beside the table in the companion table `<table>__runs`.

A run writes its row when it starts (status `running`) and rewrites it when it ends
(`finished`, `failed` or `interrupted`). A run killed outright never rewrites it; `state` then
tells `interrupted` from `running` by the recorded host and process id.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from chipscout.indexer import __version__
from chipscout.indexer.store.chip_store import ChipStore

RUNS_SUFFIX = "runs"
"""Companion suffix: the run log of table `x` is `x__runs`."""

SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("kind", pa.string()),
    pa.field("status", pa.string()),
    pa.field("started_at", pa.timestamp("us", tz="UTC")),
    pa.field("finished_at", pa.timestamp("us", tz="UTC")),
    pa.field("host", pa.string()),
    pa.field("pid", pa.int64()),
    pa.field("chipscout_version", pa.string()),
    pa.field("table_version_before", pa.int64()),
    pa.field("table_version_after", pa.int64()),
    pa.field("request", pa.string()),
    pa.field("result", pa.string()),
    pa.field("error", pa.string()),
])

#: Lists of sources longer than this are recorded as their first entries and a count.
MAX_RECORDED_SOURCES = 1000


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    kind: str
    """`index`, `restore` or `cleanup`."""
    status: str
    """`running`, `finished` (failures of single sources included), `failed` or `interrupted`."""
    started_at: datetime
    finished_at: datetime | None = None
    host: str = ""
    pid: int = 0
    chipscout_version: str = __version__
    table_version_before: int | None = None
    table_version_after: int | None = None
    request: dict[str, Any] = field(default_factory=dict)
    """What was asked: sources, encoder and parameters."""
    result: dict[str, Any] = field(default_factory=dict)
    """What happened: counts, failures with reasons, durations."""
    error: str = ""

    @property
    def state(self) -> str:
        """The status, with `running` resolved to `interrupted` when its process is gone."""
        if self.status == "running" and self.host == socket.gethostname() and not _alive(self.pid):
            return "interrupted"
        return self.status

    @property
    def elapsed_s(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    def to_row(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "kind": self.kind, "status": self.status,
            "started_at": self.started_at, "finished_at": self.finished_at, "host": self.host,
            "pid": self.pid, "chipscout_version": self.chipscout_version,
            "table_version_before": self.table_version_before,
            "table_version_after": self.table_version_after,
            "request": json.dumps(self.request, default=str, sort_keys=True),
            "result": json.dumps(self.result, default=str, sort_keys=True),
            "error": self.error,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RunRecord:
        return cls(
            run_id=row["run_id"], kind=row["kind"] or "", status=row["status"] or "",
            started_at=row["started_at"], finished_at=row["finished_at"], host=row["host"] or "",
            pid=int(row["pid"] or 0), chipscout_version=row["chipscout_version"] or "",
            table_version_before=row["table_version_before"],
            table_version_after=row["table_version_after"],
            request=json.loads(row["request"] or "{}"), result=json.loads(row["result"] or "{}"),
            error=row["error"] or "")

    def to_dict(self) -> dict[str, Any]:
        return {**self.to_row(), "state": self.state, "elapsed_s": self.elapsed_s,
                "request": self.request, "result": self.result}


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _write(store: ChipStore, run: RunRecord) -> RunRecord:
    store.companion_upsert(RUNS_SUFFIX, pa.Table.from_pylist([run.to_row()], schema=SCHEMA),
                           on=["run_id"])
    return run


def _table_version(store: ChipStore) -> int | None:
    return store.version if store.exists() else None


def start_run(store: ChipStore, request: dict[str, Any], kind: str = "index") -> RunRecord:
    """Record a run that begins now, with what it was asked to do."""
    return _write(store, RunRecord(
        run_id=uuid.uuid4().hex, kind=kind, status="running", started_at=_now(),
        host=socket.gethostname(), pid=os.getpid(), table_version_before=_table_version(store),
        request=request))


def finish_run(store: ChipStore, run: RunRecord, result: dict[str, Any],
               error: BaseException | None = None) -> RunRecord:
    """Rewrite `run`'s row with what happened; `error` marks it failed (or interrupted)."""
    if error is None:
        status, message = "finished", ""
    elif isinstance(error, (KeyboardInterrupt, SystemExit)):
        status, message = "interrupted", type(error).__name__
    else:
        status, message = "failed", f"{type(error).__name__}: {error}"
    return _write(store, replace(run, status=status, finished_at=_now(), result=result,
                                 error=message, table_version_after=_table_version(store)))


def record_action(store: ChipStore, kind: str, request: dict[str, Any], result: dict[str, Any],
                  version_before: int | None) -> RunRecord:
    """One finished row for a table operation other than indexing (restore, cleanup)."""
    now = _now()
    return _write(store, RunRecord(
        run_id=uuid.uuid4().hex, kind=kind, status="finished", started_at=now, finished_at=now,
        host=socket.gethostname(), pid=os.getpid(), table_version_before=version_before,
        table_version_after=_table_version(store), request=request, result=result))


def list_runs(store: ChipStore, limit: int | None = None) -> list[RunRecord]:
    """The table's runs, newest first."""
    rows = store.companion_rows(RUNS_SUFFIX)
    if rows is None:
        return []
    runs = [RunRecord.from_row(r) for r in rows.to_pylist()]
    runs.sort(key=lambda r: r.started_at, reverse=True)
    return runs[:limit] if limit is not None else runs


def recorded_sources(locations: list[str]) -> dict[str, Any]:
    """The `sources` entry of a request, capped at `MAX_RECORDED_SOURCES` names."""
    return {"sources": locations[:MAX_RECORDED_SOURCES], "source_count": len(locations)}


def describe(run: RunRecord) -> str:
    """One line: when, what, state, counts."""
    when = run.started_at.strftime("%Y-%m-%d %H:%M:%S")
    took = f" in {run.elapsed_s:.1f} s" if run.elapsed_s is not None else ""
    versions = ""
    if run.table_version_after is not None:
        before = "new" if run.table_version_before is None else f"v{run.table_version_before}"
        versions = f", {before}->v{run.table_version_after}"
    if run.kind == "index":
        r = run.result
        counts = (f": {r.get('chips_new', 0)} new, {r.get('chips_present', 0)} present, "
                  f"{r.get('chips_skipped_nodata', 0) + r.get('chips_skipped_cloud', 0)} skipped, "
                  f"{r.get('chips_failed', 0)} failed, {len(r.get('failures', []))} source failure(s)"
                  if r else "")
        sources = run.request.get("source_count", "?")
        what = f"index {sources} source(s)"
    else:
        counts = f": {json.dumps(run.request, default=str)}"
        what = run.kind
    error = f" ({run.error})" if run.error else ""
    return f"{when}  {run.run_id[:8]}  {what:<22} {run.state}{took}{versions}{counts}{error}"
