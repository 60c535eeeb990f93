"""How long `chipscout` takes before it does anything: `chipscout --help` and a one-shot
`chipscout search` by a stored chip id, each beside bare `python -c pass` and `python -c
"import torch"` (what every command paid before issue 18), in turns, in the same run.

    python bench/cli_startup.py --db /path/to/db --table demo            # a table made by `chipscout demo`
    python bench/cli_startup.py --db DB --table demo --runs 9 --json /tmp/startup.json
    python bench/cli_startup.py --db DB --table demo --peer /other/checkout/.venv/bin/chipscout

Prints one markdown row per command: median and min wall seconds over --runs, the median minus
bare Python's, and the load average before and after (the machine is shared: say it with every
figure). Runs are interleaved (one of each command per turn), so a burst of load hits all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def chipscout_executable() -> str:
    beside = Path(sys.executable).with_name("chipscout")
    found = str(beside) if beside.exists() else shutil.which("chipscout")
    if not found:
        sys.exit("chipscout is not installed beside this Python (pip install -e .)")
    return found


def first_chip_id(db: str, table: str) -> str:
    import chipscout

    return chipscout.connect(db).open_table(table).sample(1)[0].chip_id


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True, help="database holding the table (e.g. the demo's)")
    parser.add_argument("--table", default="demo")
    parser.add_argument("--chip", help="chip id to search by (default: one of the table's)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--peer", help="another chipscout executable (e.g. an older checkout's) to time "
                                       "side by side, as 'peer --help' and 'peer search'")
    args = parser.parse_args()

    exe = chipscout_executable()
    chip = args.chip or os.environ.get("CHIPSCOUT_BENCH_CHIP") or first_chip_id(args.db, args.table)
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "chipscout --help": [exe, "--help"],
        "chipscout search (one-shot, k=10)": [exe, "search", chip, "--db", args.db, "--table", args.table],
    }
    if args.peer:
        commands["peer --help"] = [args.peer, "--help"]
        commands["peer search (one-shot, k=10)"] = [args.peer, "search", chip, "--db", args.db, "--table", args.table]
    for command in commands.values():  # warm the page cache once; not counted
        timed(command)
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, command in commands.items():
            times[name].append(timed(command))
    load_after = os.getloadavg()

    bare = statistics.median(times["python -c pass"])
    print(f"{args.runs} runs each, interleaved; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after (1 min); {os.cpu_count()} CPUs\n")
    print("| command | median s | min s | median - bare Python s |")
    print("|---|---|---|---|")
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append({"command": name, "median_s": median, "min_s": min(values), "over_bare_s": median - bare,
                     "runs_s": values})
        print(f"| {name} | {median:.3f} | {min(values):.3f} | {median - bare:+.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"load_before": load_before, "load_after": load_after,
                                         "chip": chip, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
