"""`chipscout thumbnails`: real RGB pictures for a product table's chips, from local imagery.

No `from __future__ import annotations`: typer reads these annotations at runtime. Nothing heavy
is imported at module level.
"""

from pathlib import Path
from typing import Annotated, Optional

import typer

from chipscout.indexer.cli.options import DbOption, JsonOption, StorageOption, TableOption, db_uri, print_json, split, storage_options


def thumbnails_command(
    imagery: Annotated[list[Path], typer.Argument(help="Imagery of the same place: multi-band rasters or folders of band files.")],
    sensor: Annotated[str, typer.Option(help="Band table of the imagery: sentinel-2-l2a, sentinel-2-l1c, landsat-c2-l2, naip, rgb8.")] = "sentinel-2-l2a",
    file_bands: Annotated[Optional[str], typer.Option("--file-bands", help="Band names of a multi-band file, in file order.")] = None,
    size: Annotated[int, typer.Option("--size", help="Thumbnail side in pixels (at most 128).")] = 64,
    db: DbOption = None,
    table: TableOption = "chips",
    as_json: JsonOption = False,
    storage_option: StorageOption = None,
) -> None:
    """Draw RGB thumbnails from IMAGERY for the chips it covers (a product table's PCA pictures are replaced)."""
    from chipscout.indexer.errors import ChipscoutError
    from chipscout.indexer.ingest.imagery_thumbnails import draw_imagery_thumbnails
    from chipscout.indexer.sources import local_source
    from chipscout.indexer.store import ChipStore

    if not 8 <= size <= 128:
        raise ChipscoutError(f"--size must be within 8..128 px, got {size}")
    sources = [local_source(p, sensor=sensor, file_bands=split(file_bands)) for p in imagery]
    store = ChipStore(db_uri(db), table, storage_options=storage_options(storage_option))
    drawn = draw_imagery_thumbnails(store, sources, out_px=size)
    if as_json:
        print_json({"table": table, "thumbnails_drawn": drawn})
    else:
        typer.echo(f"{table}: {drawn} chip(s) got an RGB thumbnail from {len(sources)} imagery source(s)")
