"""`python -m chipscout.indexer.cli`: the same as the `chipscout` command."""

from chipscout.indexer.cli.commands import main

main()
