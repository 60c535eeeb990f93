"""The `chipscout` command line: one red line and a non-zero exit for every user error."""

from chipscout.indexer.cli.commands import app, main

__all__ = ["app", "main"]
