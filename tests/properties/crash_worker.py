"""A fork server for the crash test: imports chipscout once, then runs indexing jobs in forked
children that the test kills with SIGKILL from outside.

Run from the repository root as `python -m tests.properties.crash_worker SPEC_JSON`. SPEC_JSON holds `sources` (path, source_id,
acquired) and the `index_sources` keywords (`encoder`, `size_px`, `bands`, `batch_size`,
`commit_every`, `fit_sample_chips`). Commands on stdin, one a line:

    run DB TABLE   fork a child that indexes the sources into DB/TABLE; prints `child PID`,
                   then `exit PID CODE` when it ends (CODE < 0: killed by signal -CODE).
                   The child prints `commit` after each commit of chips, and `summary JSON`
                   when it finishes.
    quit

A forked child starts in milliseconds (torch, GDAL and LanceDB are already imported, and the
parent never used them, so no thread or lock is copied mid-use); a fresh interpreter would
spend seconds importing torch before each kill. The child is left unreaped (`WNOWAIT`) until
the next command, so its pid cannot be reused while the test may still signal it.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings

warnings.filterwarnings("ignore", message="lancedb fork support")

import torch  # noqa: E402

from chipscout.indexer.chips import ChipGrid  # noqa: E402
from chipscout.indexer.sources.files import local_source, parse_datetime  # noqa: E402
from chipscout.indexer.ingest import EncoderChoice, index_sources  # noqa: E402
from chipscout.indexer.store import ChipStore  # noqa: E402


def announce_commits() -> None:
    """Print `commit` after each commit of chip rows, so the test can aim its kills at random
    points spread over the whole run (the kills themselves still come from outside)."""
    upsert = ChipStore.upsert

    def announced(self, rows):
        inserted = upsert(self, rows)
        os.write(sys.stdout.fileno(), b"commit\n")
        return inserted

    ChipStore.upsert = announced


def run_child(spec: dict, db: str, table: str) -> None:
    torch.set_num_threads(1)  # the same in every child: bit-equal vectors need equal threading
    announce_commits()
    sources = [local_source(s["path"], sensor=spec.get("sensor", "sentinel-2-l2a"),
                            source_id=s["source_id"],
                            acquired=parse_datetime(s["acquired"]) if s.get("acquired") else None)
               for s in spec["sources"]]
    summary = index_sources(
        sources, db_uri=db, table_name=table,
        encoder=EncoderChoice(spec["encoder"]["name"], spec["encoder"]["params"]),
        grid=ChipGrid(spec["size_px"], spec["size_px"]), bands=spec["bands"],
        batch_size=spec["batch_size"], commit_every=spec["commit_every"],
        fit_sample_chips=spec["fit_sample_chips"], device="cpu", progress=False)
    # One write(2) call, so a kill cannot cut the line in two and glue it to the next one.
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), ("summary " + json.dumps(summary.to_dict(), default=str) + "\n").encode())


def main() -> None:
    spec = json.loads(sys.argv[1])
    print("ready", flush=True)
    unreaped: int | None = None
    for line in sys.stdin:
        if unreaped is not None:
            os.waitpid(unreaped, 0)
            unreaped = None
        command = line.split()
        if not command or command[0] == "quit":
            break
        if command[0] != "run" or len(command) != 3:
            print(f"error unknown command {line.strip()!r}", flush=True)
            continue
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run_child(spec, command[1], command[2])
            except BaseException:
                traceback.print_exc()
                code = 3
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(f"child {pid}", flush=True)
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        unreaped = pid
        print(f"exit {pid} {code}", flush=True)
    if unreaped is not None:
        os.waitpid(unreaped, 0)


if __name__ == "__main__":
    main()
