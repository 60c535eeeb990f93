"""`chipscout index files` and `chipscout index stac`: embed imagery into a chip table.

Both take the encoder flags declared once (`options.with_encoder_flags`), build one `IndexJob`
from their flags (`options.index_job`) and hand it to the ingest doors.
No `from __future__ import annotations`: typer reads these annotations at runtime.
"""

from pathlib import Path
from typing import Annotated, Optional

import typer

from chipscout.indexer.cli.options import (BandsOpt, BatchSizeOpt, ClusterOption, DbOption, DeviceOpt,
                                           JsonOption, MaxChipsOpt, MaxNodataOpt, ProgressOpt, SchedulerOption, SizeOpt,
                                           StorageOption, StrideOpt, IndexTableOption, TimeoutOpt, failures_reported, index_job, print_json, product_sensor,
                                           report_summary, split, with_encoder_flags)
from chipscout.indexer.errors import ChipscoutError

#: `ingest.job.DEFAULT_MAX_CHIPS_PER_SOURCE`, spelled here so `--help` imports no torch.
DEFAULT_MAX_CHIPS_PER_SOURCE = 1_000_000

index_app = typer.Typer(help="Embed imagery into a chip table.", no_args_is_help=True)


@index_app.command("files")
@with_encoder_flags
def index_files(
    paths: Annotated[list[Path], typer.Argument(help="Multi-band rasters, or folders of single-band files (one scene each).")],
    sensor: Annotated[str, typer.Option(help="Band table to use: sentinel-2-l1c, sentinel-2-l2a, landsat-c2-l2, naip, rgb8.")] = "sentinel-2-l2a",
    file_bands: Annotated[Optional[str], typer.Option("--file-bands", help="Band names of a multi-band file, in file order (e.g. B02,B03,B04,B08).")] = None,
    bands: BandsOpt = None,
    date: Annotated[Optional[str], typer.Option(help="Acquisition date (RFC 3339) when the files do not say.")] = None,
    source_id: Annotated[Optional[str], typer.Option("--source-id", help="Source id (one path only); default: the file or folder name.")] = None,
    size: SizeOpt = 128,
    stride: StrideOpt = None,
    encoder_flags: Optional[dict] = None,
    max_nodata: MaxNodataOpt = 0.5,
    max_chips_per_source: MaxChipsOpt = DEFAULT_MAX_CHIPS_PER_SOURCE,
    batch_size: BatchSizeOpt = 32,
    device: DeviceOpt = None,
    db: DbOption = None,
    table: IndexTableOption = "chips",
    as_json: JsonOption = False,
    progress: ProgressOpt = True,
    commit_every: Annotated[int, typer.Option("--commit-every", help="Chips per atomic commit; a killed run loses at most this many.")] = 512,
    resume: Annotated[bool, typer.Option("--resume", help="Finish an interrupted run. Always on: chips already stored are skipped without being read.")] = False,
    cluster: ClusterOption = None,
    scheduler: SchedulerOption = None,
    storage_option: StorageOption = None,
    transform: Annotated[Optional[str], typer.Option("--transform", help="Vector transform of a new table: a spec such as 'power:0.4,standardize,pca-whiten:64:10,l2', 'none', or 'default' (the encoder family's measured default). Appends reuse the table's.")] = None,
) -> None:
    """Index local GeoTIFF/COG files (resumes where an earlier run stopped)."""
    from chipscout.indexer.ingest import index
    from chipscout.indexer.sources import local_source, parse_datetime

    flags = dict(locals())
    if source_id and len(paths) > 1:
        raise ChipscoutError("--source-id names one source; give one path with it")
    product = product_sensor(encoder_flags, sensor, "sentinel-2-l2a")
    if product is not None and not date and encoder_flags["year"]:
        date = f"{encoder_flags['year']}-01-01"  # an annual product: the year is the chips' date
    acquired = parse_datetime(date, "--date") if date else None
    sources = [local_source(p, sensor=product or sensor, file_bands=split(file_bands), acquired=acquired,
                            source_id=source_id) for p in paths]
    job = index_job(flags, "chipscout index files", commit_every=commit_every,
                    **({"transform": transform} if transform else {}))
    with failures_reported(as_json):
        summary = index(sources, job)
    report_summary(summary, as_json)


@index_app.command("stac")
@with_encoder_flags
def index_stac(
    url: Annotated[str, typer.Option("--url", help="STAC API root, e.g. https://earth-search.aws.element84.com/v1 or https://planetarycomputer.microsoft.com/api/stac/v1.")],
    collection: Annotated[str, typer.Option("--collection", help="Collection id: sentinel-2-l2a, landsat-c2-l2, ...")],
    bbox: Annotated[Optional[str], typer.Option("--bbox", help="MINLON,MINLAT,MAXLON,MAXLAT in degrees (EPSG:4326).")] = None,
    intersects: Annotated[Optional[Path], typer.Option("--intersects", help="GeoJSON file (geometry, Feature or FeatureCollection) to search within, instead of --bbox.")] = None,
    datetime: Annotated[Optional[str], typer.Option("--datetime", help="RFC 3339 date, date-time or interval START/END ('..' = open), e.g. 2024-06-01/2024-08-31.")] = None,
    max_cloud: Annotated[Optional[float], typer.Option("--max-cloud", help="Skip items whose eo:cloud_cover exceeds this percentage (0..100).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Index at most this many items.")] = None,
    sensor: Annotated[Optional[str], typer.Option(help="Band table (default: from the collection id).")] = None,
    bands: BandsOpt = None,
    size: SizeOpt = 128,
    stride: StrideOpt = None,
    encoder_flags: Optional[dict] = None,
    max_nodata: MaxNodataOpt = 0.5,
    max_chips_per_source: MaxChipsOpt = DEFAULT_MAX_CHIPS_PER_SOURCE,
    max_chip_cloud: Annotated[Optional[float], typer.Option("--max-chip-cloud", help="Skip chips whose cloud fraction (from SCL / QA_PIXEL) exceeds this (0..1).")] = None,
    batch_size: BatchSizeOpt = 32,
    timeout: TimeoutOpt = 60.0,
    allow_href_scheme: Annotated[Optional[list[str]], typer.Option("--allow-href-scheme", help="Also read asset hrefs of this scheme (repeatable), e.g. file or gs; default http, https, s3.")] = None,
    allow_host: Annotated[Optional[list[str]], typer.Option("--allow-host", help="Read asset hrefs on this loopback/private HOST or HOST:PORT (repeatable; also $CHIPSCOUT_ALLOW_HOSTS); default only the catalogue's own.")] = None,
    read_workers: Annotated[int, typer.Option("--read-workers", help="Items read at once, each by its own thread (reads wait on the network).")] = 4,
    device: DeviceOpt = None,
    db: DbOption = None,
    table: IndexTableOption = "chips",
    as_json: JsonOption = False,
    progress: ProgressOpt = True,
    cluster: ClusterOption = None,
    scheduler: SchedulerOption = None,
    storage_option: StorageOption = None,
) -> None:
    """Index the items of a STAC API search (Earth Search, Planetary Computer, ...)."""
    from chipscout.indexer.ingest import index_search
    from chipscout.indexer.sources import HrefPolicy, StacQuery, StacSearch

    flags = dict(locals())
    if max_chip_cloud is not None and not 0.0 <= max_chip_cloud <= 1.0:
        raise ChipscoutError(f"--max-chip-cloud must be within 0..1, got {max_chip_cloud}")
    if read_workers < 1:
        raise ChipscoutError(f"--read-workers must be at least 1, got {read_workers}")
    query = StacQuery.build(url, collection, bbox=bbox, intersects=intersects, datetime=datetime,
                            max_cloud_cover=max_cloud, max_items=limit)
    # A cluster reads one item per worker task: --read-workers is for a run in this process.
    if not timeout > 0:
        raise ChipscoutError(f"--timeout must be a positive number of seconds, got {timeout:g}")
    job = index_job(flags, "chipscout index stac", max_cloud_fraction=max_chip_cloud, http_timeout_s=timeout,
                    read_workers=1 if cluster or scheduler else read_workers)
    policy = HrefPolicy.build(query.url, allow_href_scheme or (), allow_host or ())
    sensor = product_sensor(encoder_flags, sensor, None) or sensor
    search = StacSearch(query, sensor=sensor, timeout_s=timeout, href_policy=policy)
    if search.unsigned_warning:
        typer.secho(f"warning: {search.unsigned_warning}", fg="yellow", err=True)
    with failures_reported(as_json):
        summary = index_search(search, job)
    stats = search.stats
    if as_json:
        print_json({**summary.to_dict(), "stac": stats.to_dict()})
        for failure in summary.failures:
            typer.secho(f"failed: {failure['source']}: {failure['reason']}", fg="red", err=True)
        if summary.failures:
            raise typer.Exit(2)
        return
    typer.echo(f"{query.collection}: {stats.items_matched} item(s) found, {stats.items_yielded} read, "
               f"{stats.items_over_cloud} over --max-cloud, {len(summary.failures)} failure(s)")
    report_summary(summary, as_json=False)
