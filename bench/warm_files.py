"""A restart of a warmed engine on an s3:// table, with and without the local copy of its warm
cache (`chipscout.indexer.search.warm_files`, issue 22), on moto's S3 server on loopback.

A synthetic table (`tests/synthetic.py`) is written to a bucket; then, each in a fresh process
(as a restarted service would be): a warm-up with copies off (every byte from the bucket), a
first warm-up that keeps a copy, and a restart that warms from that copy. Each prints its wall
time, the process's peak RSS, the HTTP requests moto served during it, and a checksum of ten
queries' answers (equal answers: equal checksums).

    python bench/warm_files.py --rows 100000 --dim 64

Loopback S3 is far faster than a real bucket over a network: the copy saves more there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BUCKET = "bench"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def options(endpoint: str) -> dict[str, str]:
    return {"aws_access_key_id": "bench", "aws_secret_access_key": "bench", "aws_endpoint": endpoint,
            "aws_region": "us-east-1", "allow_http": "true"}


def requests_served(log: Path) -> tuple[int, int]:
    """(HTTP requests, GETs of the table's data files) in moto's access log so far."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in log.read_text().splitlines()]
    requests = [m.group(1, 2) for line in lines if (m := re.search(r'"(GET|PUT|HEAD|POST|DELETE) (\S+)', line))]
    return len(requests), sum(1 for method, path in requests if method == "GET" and "/data/" in path)


def vmhwm_gib() -> float:
    """This process's peak resident memory (VmHWM: its own, unlike ru_maxrss, which a child
    inherits from the parent it was forked from)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def warm_once(endpoint: str, rows: int, dim: int) -> None:
    """Child process: open, warm up, answer ten queries; print one JSON line."""
    from chipscout.indexer.search import SearchEngine
    from tests.synthetic import SyntheticChips

    started = time.perf_counter()
    engine = SearchEngine(f"s3://{BUCKET}/db", "chips", options(endpoint))
    held = engine.warm_up()
    wall = time.perf_counter() - started
    answers = hashlib.sha256()
    for query in SyntheticChips(rows, dim, seed=0).queries(10):
        for r in engine.similar_to_vector(query, 10, expand=0).results:
            answers.update(f"{r.chip.chip_id}:{r.distance:.6f};".encode())
    print(json.dumps({"wall_s": wall, "peak_rss_gib": vmhwm_gib(),
                      "tier": held["vectors"], "bytes": held["bytes"],
                      "copy": getattr(engine.searcher, "last_copy", None), "answers": answers.hexdigest()[:16]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        warm_once(args.child, args.rows, args.dim)
        return

    import boto3

    from chipscout.indexer.ingest.fitted_state import encode_state
    from chipscout.indexer.store import ChipStore
    from tests.conftest import free_port
    from tests.synthetic import SyntheticChips, bench_config

    print(f"start: {uptime()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-warm-files-"))
    log = work / "moto.log"
    port = free_port()
    with open(log, "w") as sink:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=sink, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        time.sleep(3)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                     aws_secret_access_key="bench").create_bucket(Bucket=BUCKET)
        store = ChipStore(f"s3://{BUCKET}/db", "chips", options(endpoint))
        store.create(bench_config(args.dim), encode_state({}), keep_state=False)
        started = time.perf_counter()
        for batch, _ in SyntheticChips(args.rows, args.dim, seed=0).batches(50_000):
            store.upsert(batch)
        print(f"table: {args.rows:,} x {args.dim}-d written to moto S3 in {time.perf_counter() - started:.0f} s",
              flush=True)
        runs = {}
        for name, setting in (("no copy (copies off)", "off"), ("first warm-up, keeps a copy", str(work / "copies")),
                              ("restart from the copy", str(work / "copies"))):
            before, data_before = requests_served(log)
            child = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--dim", str(args.dim),
                                    "--child", endpoint], capture_output=True, text=True,
                                   env={**os.environ, "CHIPSCOUT_WARM_FILES": setting})
            if child.returncode:
                raise SystemExit(child.stderr)
            run = json.loads(child.stdout.strip().splitlines()[-1])
            time.sleep(1)  # moto's log lines of the last requests
            after, data_after = requests_served(log)
            run["s3_requests"], run["s3_data_gets"] = after - before, data_after - data_before
            runs[name] = run
            print(f"{name}: {json.dumps(run)}; {uptime()}", flush=True)
        copy_bytes = sum(p.stat().st_size for p in (work / "copies").rglob("*") if p.is_file())
        print(f"\n{args.rows:,} rows x {args.dim}-d on moto S3 (loopback); copy on local disk: "
              f"{copy_bytes / 2**20:.0f} MiB; end: {uptime()}")
        print("| run | warm-up wall s | S3 requests (all / data-file GETs; warm-up + 10 queries) | peak RSS GiB "
              "| tier | answers |")
        print("|---|---|---|---|---|---|")
        for name, run in runs.items():
            print(f"| {name} | {run['wall_s']:.2f} | {run['s3_requests']} / {run['s3_data_gets']} | "
                  f"{run['peak_rss_gib']:.2f} | "
                  f"{run['tier']} | {run['answers']} |")
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
