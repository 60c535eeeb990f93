"""Scaling of cluster indexing (`chipscout.indexer.ingest.cluster`) on this machine: chips/s with 1 and 2 Dask
worker processes, the scaling efficiency, and what one commit of a batch of units costs.

Indexes the real demo scene (Sentinel-2 L1C, 1933 x 1947 px, 10 bands) into fresh tables: in one
process (`index_sources`, the default path; with torch's default threads, and with one thread like
a worker), then on a `LocalCluster` of 1 and of 2 worker processes (one torch thread each, bound to
127.0.0.1). A run's chips/s counts everything from the preflight checks to the last commit and the
index maintenance, but not starting the cluster (which is timed apart). `--s3` adds a run on 2
workers into a bucket of a loopback S3 server (moto), for the commit cost on object storage.

    python bench/scale.py                        # 3 to 6 minutes on 2 busy cores
    python bench/scale.py --repeat 3 --s3 --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import distributed  # noqa: E402
import torch  # noqa: E402

from chipscout.indexer.chips import ChipGrid  # noqa: E402
from chipscout.indexer.sources.demo import DEMO_SOURCE_ID, prepare_demo_scene  # noqa: E402
from chipscout.indexer.ingest.cluster import index_on_cluster  # noqa: E402
from chipscout.indexer.sources.files import local_source  # noqa: E402
from chipscout.indexer.ingest import EncoderChoice, index_sources  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MotoS3:
    """moto's S3 in server mode on a loopback port, with one bucket."""

    def __enter__(self) -> MotoS3:
        import boto3

        port = free_port()
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.endpoint = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        self.options = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench",
                        "aws_endpoint": self.endpoint, "aws_region": "us-east-1", "allow_http": "true"}
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="bench",
                     aws_secret_access_key="bench").create_bucket(Bucket="bench")
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def run_cluster(source, workers: int, db: str, args, storage_options=None) -> dict:
    started = time.perf_counter()
    with distributed.LocalCluster(n_workers=workers, processes=True, threads_per_worker=1, host="127.0.0.1",
                                  dashboard_address=None, silence_logs=40) as cluster, \
            distributed.Client(cluster) as client:
        cluster_s = time.perf_counter() - started
        summary = index_on_cluster(
            [source], db_uri=db, table_name="scale", client=client, encoder=args.encoder,
            grid=args.grid, batch_size=args.batch_size, commit_every=args.commit_every,
            tile_chips=args.tile_chips, progress=False, storage_options=storage_options,
            transform=args.transform)
    return {"workers": workers, "chips": summary.chips_new, "elapsed_s": summary.elapsed_s,
            "chips_per_s": summary.chips_per_s, "cluster_start_s": cluster_s, "units": summary.units,
            "commits": summary.commits, "commit_s_per_batch": summary.commit_s / max(1, summary.commits),
            "worker_read_s": summary.worker_read_s, "worker_embed_s": summary.worker_embed_s,
            "worker_write_s": summary.worker_write_s}


def run_single(source, db: str, args, threads: int | None = None) -> dict:
    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    try:
        summary = index_sources([source], db_uri=db, table_name="scale", encoder=args.encoder, grid=args.grid,
                                batch_size=args.batch_size, commit_every=args.commit_every, progress=False,
                                transform=args.transform)
    finally:
        torch.set_num_threads(default)
    return {"workers": 0, "chips": summary.chips_new, "elapsed_s": summary.elapsed_s,
            "chips_per_s": summary.chips_per_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=80, help="chip size in px")
    parser.add_argument("--stride", type=int, default=40, help="grid stride in px (40: 2,304 chips)")
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--commit-every", type=int, default=128)
    parser.add_argument("--tile-chips", type=int, default=128, help="chips per unit of work")
    parser.add_argument("--transform", default="none",
                        help="vector transform ('none': the encoder's work only; 'default' adds fitting one)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each setting (the best is reported)")
    parser.add_argument("--s3", action="store_true", help="also index on 2 workers into a loopback S3 (moto)")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    args = parser.parse_args()
    args.grid = ChipGrid(args.size, args.stride)
    args.encoder = EncoderChoice("rcf", {"kernels": "gaussian", "features": args.features, "seed": 0})

    scene = prepare_demo_scene()
    source = local_source(scene, sensor="sentinel-2-l1c", source_id=DEMO_SOURCE_ID)
    work = Path(tempfile.mkdtemp(prefix="chipscout-scale-"))
    runs: list[dict] = []
    try:
        for attempt in range(args.repeat):
            runs.append({"setting": f"single process, {torch.get_num_threads()} torch threads",
                         **run_single(source, str(work / f"single-{attempt}"), args)})
            runs.append({"setting": "single process, 1 torch thread",
                         **run_single(source, str(work / f"single1-{attempt}"), args, threads=1)})
            for workers in (1, 2):
                runs.append({"setting": f"cluster, {workers} worker(s)",
                             **run_cluster(source, workers, str(work / f"w{workers}-{attempt}"), args)})
        if args.s3:
            with MotoS3() as s3:
                runs.append({"setting": "cluster, 2 workers, loopback S3",
                             **run_cluster(source, 2, "s3://bench/scale", args, s3.options)})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best: dict[str, dict] = {}
    for run in runs:
        if run["setting"] not in best or run["chips_per_s"] > best[run["setting"]]["chips_per_s"]:
            best[run["setting"]] = run
    one, two = best["cluster, 1 worker(s)"], best["cluster, 2 worker(s)"]
    efficiency = two["chips_per_s"] / (2 * one["chips_per_s"])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"work: demo scene, {one['chips']} chips of {args.size} px (stride {args.stride}), 10 bands, "
          f"rcf-gaussian {args.features} features, batch {args.batch_size}, {args.tile_chips} chips a unit, "
          f"a commit every {args.commit_every} chips, transform {args.transform}; best of {args.repeat}\n")
    print("| setting | chips/s | run s | cluster start s | units | commits | commit s / batch "
          "| worker read / embed / write s |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for setting, run in best.items():
        if run["workers"]:
            print(f"| {setting} | {run['chips_per_s']:.1f} | {run['elapsed_s']:.1f} | {run['cluster_start_s']:.1f} "
                  f"| {run['units']} | {run['commits']} | {run['commit_s_per_batch']:.3f} "
                  f"| {run['worker_read_s']:.1f} / {run['worker_embed_s']:.1f} / {run['worker_write_s']:.1f} |")
        else:
            print(f"| {setting} | {run['chips_per_s']:.1f} | {run['elapsed_s']:.1f} | - | - | - | - | - |")
    print(f"\nscaling efficiency, 2 workers against 1: {efficiency:.2f} "
          f"({two['chips_per_s']:.1f} / (2 x {one['chips_per_s']:.1f}) chips/s)")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "efficiency": efficiency}, indent=2))


if __name__ == "__main__":
    main()
