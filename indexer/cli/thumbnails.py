"""`chipscout thumbnails`: real RGB pictures for a product table's chips, from local imagery or
from the items of a STAC API search over the table's chips.

No `from __future__ import annotations`: typer reads these annotations at runtime. Nothing heavy
is imported at module level.
"""

from pathlib import Path
from typing import Annotated, Optional

import typer

from chipscout.indexer.cli.options import (DbOption, JsonOption, StorageOption, TableOption, TimeoutOpt, db_uri,
                                           print_json, split, storage_options)


def thumbnails_command(
    imagery: Annotated[Optional[list[Path]], typer.Argument(help="Imagery of the same place: multi-band rasters or folders of band files (or use --stac-url).")] = None,
    sensor: Annotated[Optional[str], typer.Option(help="Band table of the imagery: sentinel-2-l2a, sentinel-2-l1c, landsat-c2-l2, naip, rgb8 (default: sentinel-2-l2a, or from --collection).")] = None,
    file_bands: Annotated[Optional[str], typer.Option("--file-bands", help="Band names of a multi-band file, in file order.")] = None,
    stac_url: Annotated[Optional[str], typer.Option("--stac-url", help="Read the imagery from this STAC API's items over the table's chips instead of IMAGERY.")] = None,
    collection: Annotated[Optional[str], typer.Option("--collection", help="Collection id to search (with --stac-url), e.g. sentinel-2-l2a.")] = None,
    datetime: Annotated[Optional[str], typer.Option("--datetime", help="With --stac-url: RFC 3339 date, date-time or interval START/END, e.g. 2024-06-01/2024-08-31.")] = None,
    max_cloud: Annotated[Optional[float], typer.Option("--max-cloud", help="With --stac-url: skip items whose eo:cloud_cover exceeds this percentage (0..100).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="With --stac-url: read at most this many items.")] = None,
    timeout: TimeoutOpt = 60.0,
    allow_href_scheme: Annotated[Optional[list[str]], typer.Option("--allow-href-scheme", help="With --stac-url: also read asset hrefs of this scheme (repeatable); default http, https, s3.")] = None,
    allow_host: Annotated[Optional[list[str]], typer.Option("--allow-host", help="With --stac-url: read asset hrefs on this loopback/private HOST or HOST:PORT (repeatable; also $CHIPSCOUT_ALLOW_HOSTS).")] = None,
    size: Annotated[int, typer.Option("--size", help="Thumbnail side in pixels (at most 128).")] = 64,
    db: DbOption = None,
    table: TableOption = "chips",
    as_json: JsonOption = False,
    storage_option: StorageOption = None,
) -> None:
    """Draw RGB thumbnails from IMAGERY, or from a STAC API's items, for the chips they cover (a product table's PCA pictures are replaced)."""
    from chipscout.indexer.errors import ChipscoutError
    from chipscout.indexer.store import ChipStore

    if not 8 <= size <= 128:
        raise ChipscoutError(f"--size must be within 8..128 px, got {size}")
    if bool(imagery) == bool(stac_url):
        raise ChipscoutError("give either IMAGERY or --stac-url (with --collection), not both nor neither")
    store = ChipStore(db_uri(db), table, storage_options=storage_options(storage_option))
    if stac_url:
        _from_stac(store, table, stac_url, collection, sensor, datetime, max_cloud, limit, timeout,
                   allow_href_scheme, allow_host, size, as_json)
        return
    from chipscout.indexer.ingest.imagery_thumbnails import draw_imagery_thumbnails
    from chipscout.indexer.sources import local_source

    sources = [local_source(p, sensor=sensor or "sentinel-2-l2a", file_bands=split(file_bands)) for p in imagery]
    drawn = draw_imagery_thumbnails(store, sources, out_px=size)
    if as_json:
        print_json({"table": table, "thumbnails_drawn": drawn})
    else:
        typer.echo(f"{table}: {drawn} chip(s) got an RGB thumbnail from {len(sources)} imagery source(s)")


def _from_stac(store, table: str, url: str, collection: Optional[str], sensor: Optional[str],
               datetime: Optional[str], max_cloud: Optional[float], limit: Optional[int], timeout: float,
               allow_href_scheme: Optional[list[str]], allow_host: Optional[list[str]], size: int,
               as_json: bool) -> None:
    """`thumbnails --stac-url`: search the API over the table's chips and draw from the items."""
    from chipscout.indexer.errors import ChipscoutError
    from chipscout.indexer.ingest.imagery_thumbnails import draw_stac_thumbnails, table_lonlat_bounds
    from chipscout.indexer.sources import HrefPolicy, StacQuery, StacSearch

    if not collection:
        raise ChipscoutError("--stac-url needs --collection (e.g. sentinel-2-l2a)")
    if not timeout > 0:
        raise ChipscoutError(f"--timeout must be a positive number of seconds, got {timeout:g}")
    if not store.exists():
        raise ChipscoutError(f"no table {store.table_name!r} in {store.db_uri}")
    bounds = table_lonlat_bounds(store)
    if bounds is None:
        raise ChipscoutError(f"table {table!r} has no chips to draw")
    try:
        query = StacQuery.build(url, collection, bbox=bounds, datetime=datetime, max_cloud_cover=max_cloud,
                                max_items=limit)
    except ChipscoutError as err:  # its messages name `index stac`'s --url
        raise ChipscoutError(str(err).replace("--url", "--stac-url")) from None
    policy = HrefPolicy.build(query.url, allow_href_scheme or (), allow_host or ())
    search = StacSearch(query, sensor=sensor, timeout_s=timeout, href_policy=policy)
    if search.unsigned_warning:
        typer.secho(f"warning: {search.unsigned_warning}", fg="yellow", err=True)
    report = draw_stac_thumbnails(store, search, out_px=size, http_timeout_s=timeout)
    if as_json:
        print_json({"table": table, **report.to_dict(), "stac": search.stats.to_dict()})
    else:
        typer.echo(f"{table}: {report.thumbnails_drawn} chip(s) got an RGB thumbnail from {report.items_read} "
                   f"STAC item(s); {report.chips_without_imagery} chip(s) outside any item keep their picture")
    for failure in report.failures:
        typer.secho(f"failed: {failure['source']}: {failure['reason']}", fg="red", err=True)
    if report.failures:
        raise typer.Exit(2)
