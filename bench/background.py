"""Deliberate background load for the benches: one busy-looping process per core, so a figure
shows what users get on a shared machine (`--load background` in rcf_throughput.py, search.py)."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager


def _spin() -> None:
    while True:
        pass


@contextmanager
def background_load(processes: int | None = None) -> Iterator[int]:
    """Run `processes` (default: one per core) busy loops until the block ends."""
    count = processes if processes is not None else (os.cpu_count() or 1)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch, no threads
    spinners = [context.Process(target=_spin, daemon=True, name=f"busy-{i}") for i in range(count)]
    for spinner in spinners:
        spinner.start()
    time.sleep(0.5)  # let them reach the loop
    try:
        yield count
    finally:
        for spinner in spinners:
            spinner.terminate()
        for spinner in spinners:
            spinner.join()


def peak_rss_reset() -> None:
    """Reset this process's peak resident set (Linux: /proc/self/clear_refs), so `peak_rss_gib`
    then measures one step; a no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def peak_rss_gib() -> float | None:
    """This process's peak resident set since the last `peak_rss_reset` (VmHWM), in GiB."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None
