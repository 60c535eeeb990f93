"""Crash safety: an indexing run killed with SIGKILL at random moments, then resumed, again and
again, ends with exactly the table an uninterrupted run writes, chip by chip and bit by bit.

The runs are forked from a worker process (`tests/crash_worker.py`) that has imported torch once,
so each kill costs milliseconds rather than an interpreter start; the kills themselves are real
SIGKILLs sent from this process at random (seeded) delays.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from chipscout.indexer.chips import make_chip_id
from chipscout.indexer.store.runlog import list_runs
from chipscout.indexer.store import ChipStore

WORKER = Path(__file__).resolve().parents[1] / "crash_worker.py"
SEED = 20240615
MIN_KILLS = 20
SIZE_PX = 32
BATCH = 4


def crash_sources(small_cog: Path, small_scene_dir: Path, folder: Path) -> list[dict]:
    """Four small real sources of different kinds: a 4-band COG, a folder of single-band COGs
    (10, 20, 60 m), a cut with a nodata corner, and a float raster with NaN holes."""
    with rasterio.open(small_cog) as src:
        data, profile = src.read(), src.profile | {"driver": "GTiff"}
        descriptions = src.descriptions
        transform = src.transform
    cut = data[:, 40:240, 0:232].copy()
    cut[:, :64, :96] = 0  # nodata corner: its chips are skipped, the edge ones kept
    cut_path = folder / "cut-c.tif"
    with rasterio.open(cut_path, "w", **(profile | {
            "width": 232, "height": 200, "transform": window_transform(Window(0, 40, 232, 200), transform),
            "blockxsize": 64, "blockysize": 64, "tiled": True})) as out:
        out.write(cut)
        for i, d in enumerate(descriptions, start=1):
            out.set_band_description(i, d)
    floats = data.astype(np.float32)
    floats[:, 100:180, 30:90] = np.nan  # NaN pixels count as nodata
    floats[:, 5, 200:240] = np.inf
    float_path = folder / "float-d.tif"
    with rasterio.open(float_path, "w", **(profile | {"dtype": "float32", "nodata": None})) as out:
        out.write(floats)
        for i, d in enumerate(descriptions, start=1):
            out.set_band_description(i, d)
    return [  # width and height (px) are for the test's own bookkeeping
        {"path": str(small_cog), "source_id": "cog-a", "acquired": "2024-06-15",
         "width": 256, "height": 256},
        {"path": str(small_scene_dir), "source_id": "folder-b", "acquired": "2024-07-01T10:30:00Z",
         "width": 256, "height": 256},
        {"path": str(cut_path), "source_id": "cut-c", "acquired": "2024-08-02",
         "width": 232, "height": 200},
        {"path": str(float_path), "source_id": "float-d", "width": 256, "height": 256},
    ]


class Worker:
    """The fork server, driven line by line."""

    def __init__(self, spec: dict):
        self.process = subprocess.Popen([sys.executable, "-m", "tests.properties.crash_worker", json.dumps(spec)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        cwd=str(WORKER.parents[1]))
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        assert self.next_line(120) == "ready"

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def next_line(self, timeout: float) -> str:
        line = self.lines.get(timeout=timeout)
        if line is None:
            raise AssertionError(f"crash worker ended (exit {self.process.wait()})")
        return line

    def start(self, db: Path, table: str) -> int:
        self.process.stdin.write(f"run {db} {table}\n")
        self.process.stdin.flush()
        line = self.next_line(60)
        assert line.startswith("child "), line
        return int(line.split()[1])

    def next_event(self, pid: int, timeout: float) -> tuple[str, object]:
        """("commit", None), ("summary", dict) or ("exit", code); queue.Empty after `timeout`."""
        line = self.next_line(timeout)
        if line == "commit":
            return "commit", None
        if line.startswith("summary "):
            try:
                return "summary", json.loads(line[len("summary "):])
            except json.JSONDecodeError as err:
                raise AssertionError(f"garbled worker line {line!r}") from err
        if line.startswith("exit "):
            _, child, code = line.split()
            assert int(child) == pid, line
            return "exit", int(code)
        raise AssertionError(f"unexpected worker line {line!r}")

    def run_to_end(self, pid: int) -> tuple[int, dict | None, list[float]]:
        """Wait for the child to end: (exit code, summary, times of its commits since now)."""
        started, commits, summary = time.perf_counter(), [], None
        while True:
            kind, value = self.next_event(pid, 300)
            if kind == "commit":
                commits.append(time.perf_counter() - started)
            elif kind == "summary":
                summary = value
            else:
                return value, summary, commits

    def close(self) -> None:
        try:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            self.process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()


def table_rows(db: Path, table: str) -> dict[str, dict]:
    rows = ChipStore(str(db), table).scan().drop_columns(["indexed_at"])
    return {r["chip_id"]: r for r in rows.to_pylist()}


def batch_groups(rows: dict[str, dict], sources: list[dict]) -> list[set[str]]:
    """The chip ids of each batch group (BATCH consecutive grid positions of a source) that the
    complete table holds: a commit holds whole groups only."""
    groups = []
    for source in sources:
        grid = [(r, c) for r in range(0, source["height"] - SIZE_PX + 1, SIZE_PX)
                for c in range(0, source["width"] - SIZE_PX + 1, SIZE_PX)]
        for start in range(0, len(grid), BATCH):
            ids = {make_chip_id(source["source_id"], r, c, SIZE_PX) for r, c in grid[start:start + BATCH]}
            groups.append(ids & set(rows))
    return [g for g in groups if g]


@pytest.fixture(scope="module")
def crash_spec(small_cog, small_scene_dir, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("crash-sources")
    return {
        "sources": crash_sources(small_cog, small_scene_dir, folder),
        # Empirical kernels and (with 160 features) the default fitted vector transform: both are
        # fitted state that a resumed run must reuse, not fit again.
        "encoder": {"name": "rcf", "params": {"kernels": "empirical", "features": 160, "seed": 7,
                                               "patch_pool_size": 4000}},
        "size_px": SIZE_PX, "bands": ["blue", "green", "red", "nir"], "batch_size": BATCH,
        "commit_every": 4, "fit_sample_chips": 48,
    }


def kill_point(rng: random.Random, first_commit_s: float, commit_s: float) -> tuple[int, float]:
    """Where to kill the next attempt: after 0, 1 or 2 of its commits, plus a random delay.

    Zero commits with a delay up to the reference's first commit lands anywhere in set-up
    (opening the table, fitting the encoder, creating the table, listing stored chips); after a
    commit, a delay up to one commit interval lands in reading, embedding or the next commit.
    Each attempt so gets about one commit further, and the kills spread over the whole job.
    """
    commits = rng.choice([0, 0, 1, 1, 2])
    return commits, rng.uniform(0.0, first_commit_s if commits == 0 else commit_s)


def attempt(worker: Worker, db: Path, commits: int, delay: float) -> tuple[int, dict | None]:
    """Run the job once; SIGKILL it `delay` s after its `commits`-th commit unless it ends first."""
    pid = worker.start(db, "chips")
    summary, seen = None, 0
    deadline = None if commits else time.perf_counter() + delay
    while True:
        timeout = 300 if deadline is None else max(0.0, deadline - time.perf_counter())
        try:
            kind, value = worker.next_event(pid, timeout)
        except queue.Empty:
            os.kill(pid, signal.SIGKILL)  # unreaped until the next command: the pid is still ours
            while True:
                kind, value = worker.next_event(pid, 60)
                if kind == "exit":
                    return value, summary
                if kind == "summary":
                    summary = value
        if kind == "commit":
            seen += 1
            if seen == commits:
                deadline = time.perf_counter() + delay
        elif kind == "summary":
            summary = value
        else:
            return value, summary


def test_killed_and_resumed_runs_equal_an_uninterrupted_run(crash_spec, tmp_path):
    rng = random.Random(SEED)
    worker = Worker(crash_spec)
    try:
        # The reference: one uninterrupted run, with the times of its commits.
        pid = worker.start(tmp_path / "ref", "chips")
        code, reference_summary, commit_times = worker.run_to_end(pid)
        assert code == 0 and reference_summary["failures"] == [], reference_summary
        reference = table_rows(tmp_path / "ref", "chips")
        groups = batch_groups(reference, crash_spec["sources"])
        assert len(reference) == reference_summary["chips_new"] > 150
        assert reference_summary["chips_skipped_nodata"] > 5  # the nodata corner and NaN holes
        assert len(commit_times) >= 25
        first_commit_s = commit_times[0]
        commit_s = (commit_times[-1] - commit_times[0]) / (len(commit_times) - 1)

        # Run again over the complete table: nothing is read or written, the table keeps its
        # version.
        ref_store = ChipStore(str(tmp_path / "ref"), "chips")
        ref_version = ref_store.version
        pid = worker.start(tmp_path / "ref", "chips")
        code, again, commits = worker.run_to_end(pid)
        assert code == 0 and again["chips_new"] == 0 and again["chips_present"] == len(reference)
        assert commits == [] and ChipStore(str(tmp_path / "ref"), "chips").version == ref_version

        # The same job killed at random moments and resumed until a run completes unkilled. A
        # round that completes before MIN_KILLS kills is followed by another on a fresh table.
        total_kills, rounds, attempts, before_table, rows_after_kills = 0, [], 0, 0, set()
        while total_kills < MIN_KILLS:
            db = tmp_path / f"crash-{len(rounds)}"
            kills, seen_counts = 0, []
            while True:
                attempts += 1
                assert attempts < 300, f"no run completed after {total_kills + kills} kills"
                commits, delay = kill_point(rng, first_commit_s, commit_s)
                if attempts <= 4:  # the first kills all land before the first commit: in the
                    commits = 0    # encoder's fitting or the table's creation
                code, summary = attempt(worker, db, commits, delay)
                if os.environ.get("CRASH_DEBUG"):
                    print(f"attempt {attempts}: after {commits} commits + {delay:.3f} s: exit {code}, "
                          f"rows before {seen_counts[-1:] or 0}")
                if code == -signal.SIGKILL:
                    kills += 1
                    # After every kill the table opens at a committed version that holds whole
                    # batch groups only, every row equal to the reference's.
                    if not ChipStore(str(db), "chips").exists():
                        before_table += 1
                    else:
                        rows = table_rows(db, "chips")
                        seen_counts.append(len(rows))
                        rows_after_kills.add(len(rows))
                        for chip_id, row in rows.items():
                            assert row == reference[chip_id], chip_id
                        for group in groups:
                            assert not (group & set(rows)) or group <= set(rows), "part of a batch committed"
                    continue
                assert code == 0, f"resumed run failed with exit code {code}"
                assert summary["failures"] == []
                break
            total_kills += kills
            rounds.append(kills)

            final = table_rows(db, "chips")
            assert sorted(final) == sorted(reference)
            for chip_id, row in reference.items():
                # Vectors bit for bit; every other column too, but the write time.
                assert np.array_equal(np.asarray(final[chip_id]["vector"], np.float32),
                                      np.asarray(row["vector"], np.float32)), chip_id
                assert final[chip_id] == row, chip_id
            # The fitted (empirical) kernels equal the reference's: fitted once before the first
            # commit (the same seeded sample each time), then reused from the table's state.
            crash_store = ChipStore(str(db), "chips")
            assert crash_store.config.state_sha256 == ref_store.config.state_sha256
            assert seen_counts == sorted(seen_counts)  # committed rows only ever grow

            # The run log: the last run finished with the complete table; the killed ones read as
            # interrupted (or finished, when a kill landed after a run's work was done).
            runs = list_runs(crash_store)
            assert runs[0].state == "finished" and runs[0].result["table_rows"] == len(reference)
            assert {r.state for r in runs[1:]} <= {"interrupted", "finished"}
        print(f"\ncrash test: {total_kills} SIGKILLs in {len(rounds)} round(s) {rounds}, "
              f"{attempts} runs, {len(reference)} chips of 4 sources in {len(groups)} batch groups "
              f"and {len(commit_times)} commits; {before_table} kills before the table existed, "
              f"the others at {len(rows_after_kills)} distinct committed row counts; "
              "every table identical to the uninterrupted run's")
    finally:
        worker.close()
