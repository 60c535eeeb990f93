"""The Dask client of `--cluster local[:N]` / `--scheduler tcp://HOST:PORT`, shared by indexing on a
cluster (`chipscout.indexer.ingest.cluster`) and sharded search (`chipscout.indexer.search.sharded`).
Imports neither torch nor Dask until asked: a search engine on a cluster starts without torch."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from chipscout.indexer.errors import ClusterError

#: Seconds to wait for a scheduler, and for the first worker of a remote cluster.
CONNECT_TIMEOUT_S = 20


def parse_local_cluster(spec: str) -> int | None:
    """`local` (None: one worker per core, or per GPU) or `local:N` (N worker processes)."""
    text = spec.strip().lower()
    if text == "local":
        return None
    head, _, count = text.partition(":")
    if head == "local" and count.isdigit() and int(count) >= 1:
        return int(count)
    raise ClusterError(f"bad --cluster {spec!r}: use local or local:N (N worker processes), or "
                       "--scheduler tcp://HOST:PORT for a running cluster")


def wants_cuda(device: str | None) -> bool:
    return bool(device) and str(device).startswith("cuda")


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise ClusterError("indexing on a cluster needs Dask: pip install 'chipscout[cluster]' "
                           "(dask[distributed]) here and on every worker") from None
    return distributed


@contextmanager
def dask_client(cluster: str | None = None, scheduler: str | None = None, *,
                device: str | None = None) -> Iterator[Any]:
    """A `distributed.Client` for `--cluster local[:N]` (a cluster of worker processes on this
    machine, bound to 127.0.0.1, closed on exit) or `--scheduler tcp://HOST:PORT` (a running one)."""
    if bool(cluster) == bool(scheduler):
        raise ClusterError("give one of --cluster local[:N] and --scheduler tcp://HOST:PORT")
    distributed = _import_distributed()
    if cluster:
        workers = parse_local_cluster(cluster)
        gpus = 0
        if wants_cuda(device):
            import torch  # only to count GPUs: a CPU cluster (search, most indexing) starts without it

            gpus = torch.cuda.device_count()
            if gpus == 0:
                raise ClusterError(f"--device {device} asked for, but this machine has no CUDA GPU")
            if workers is not None and workers > gpus:
                raise ClusterError(f"--cluster {cluster} with --device {device}: this machine has "
                                   f"{gpus} GPU(s), and each GPU is used by one worker process")
        count = workers or gpus or os.cpu_count() or 1
        import logging

        with distributed.LocalCluster(n_workers=count, processes=True, threads_per_worker=1,
                                      host="127.0.0.1", dashboard_address=None,
                                      silence_logs=logging.ERROR) as local, \
                distributed.Client(local) as client:
            yield client
        return
    try:
        client = distributed.Client(scheduler, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as err:
        raise ClusterError(f"cannot reach the Dask scheduler at {scheduler}: {err}") from None
    try:
        try:
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
        except (TimeoutError, OSError):
            raise ClusterError(f"the Dask scheduler at {scheduler} has no workers "
                               f"(none joined within {CONNECT_TIMEOUT_S} s)") from None
        yield client
    finally:
        client.close()
