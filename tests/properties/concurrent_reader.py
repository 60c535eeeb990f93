"""A reader for the concurrency test: searches a table in a loop while another process writes.

Run from the repository root as `python -m tests.properties.concurrent_reader DB TABLE QUERY_ID OUT STOP`.
Prints `ready` once imported, then searches until the file STOP exists (and once more after),
and writes what it saw to OUT as JSON: per round the table version its engine was on, the row
count, and the ids and distances of every search; and any exception, with its traceback.
Every third round opens a fresh `SearchEngine` (as each `chipscout search` does); the others
refresh a long-lived one (as the app does).
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from chipscout.indexer.search import SearchEngine, SearchFilters


def one_round(engine: SearchEngine, query_id: str) -> dict:
    version = engine.version
    count = engine.count()
    searches = {
        "chip": engine.similar_to_chip(query_id, 10),
        "filtered": engine.similar_to_chip(query_id, 6, SearchFilters.build(
            max_nodata_fraction=0.5, bbox="-76,37,-75,38", date_from="2024-01-01")),
        "vector": engine.similar_to_vector(engine.get_vector(query_id), 8),
    }
    return {
        "version": version, "count": count, "after_version": engine.version,
        "searches": {name: {"table_version": r.table_version,
                            "ids": [x.chip.chip_id for x in r.results],
                            "distances": [x.distance for x in r.results]}
                     for name, r in searches.items()},
    }


def main() -> None:
    db, table, query_id, out, stop = sys.argv[1:6]
    engine = SearchEngine(db, table)
    print("ready", flush=True)
    rounds, errors = [], []
    number = 0
    while True:
        stopping = Path(stop).exists()
        try:
            fresh = number % 3 == 0
            if fresh:
                engine = SearchEngine(db, table)
            else:
                engine.refresh()
            rounds.append({"fresh": fresh, **one_round(engine, query_id)})
        except Exception:
            errors.append(traceback.format_exc())
        number += 1
        if stopping:
            break
    Path(out).write_text(json.dumps({"rounds": rounds, "errors": errors}))


if __name__ == "__main__":
    main()
