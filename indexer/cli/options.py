"""Options every `chipscout` command shares, declared once, and how their values are read."""

# No `from __future__ import annotations`: typer reads these annotations at runtime.
from typing import Annotated, Optional

import typer

from chipscout.indexer.errors import ChipscoutError

DbOption = Annotated[Optional[str], typer.Option("--db", help="LanceDB database (folder or s3:// URI). Default: $CHIPSCOUT_DB or ~/.local/share/chipscout/db.")]
TableOption = Annotated[str, typer.Option("--table", help="Chip table name.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
StorageOption = Annotated[Optional[list[str]], typer.Option("--storage-option", help="Object-store option KEY=VALUE for --db s3://... (repeatable), e.g. aws_endpoint=http://127.0.0.1:9000, allow_http=true; credentials also come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION.")]
ClusterOption = Annotated[Optional[str], typer.Option("--cluster", help="Index on a Dask cluster of worker processes on this machine: local (one per core) or local:N.")]
SchedulerOption = Annotated[Optional[str], typer.Option("--scheduler", help="Index on a running Dask cluster: its scheduler, tcp://HOST:PORT.")]


def db_uri(db: Optional[str]) -> str:
    """`--db`, or the default database ($CHIPSCOUT_DB or the per-user data directory)."""
    from chipscout.indexer.paths import default_db_uri

    return db or default_db_uri()


def storage_options(pairs: Optional[list[str]]) -> Optional[dict[str, str]]:
    """`--storage-option KEY=VALUE` options as a dict (None when none were given)."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ChipscoutError(f"bad --storage-option {pair!r}: expected KEY=VALUE, e.g. allow_http=true")
        options[key.strip()] = value.strip()
    return options or None
