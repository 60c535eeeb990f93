"""`chipscout index stac`: search a STAC API and index the items it finds.

The command shares its encoder, grid and table options with `index files` (indexer/cli.py). It
is built by `index_stac_command()` once `chipscout.indexer.cli.commands` has defined those options, so either module
may be imported first (and `python -m chipscout.indexer.cli.commands` works).
"""

# No `from __future__ import annotations`: typer reads these annotations, and they name the
# option aliases of chipscout.indexer.cli.commands, which exist only inside the factory below.
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer


def index_stac_command():
    from chipscout.indexer.cli import commands as cli

    def index_stac(
        url: Annotated[str, typer.Option("--url", help="STAC API root, e.g. https://earth-search.aws.element84.com/v1 or https://planetarycomputer.microsoft.com/api/stac/v1.")],
        collection: Annotated[str, typer.Option("--collection", help="Collection id: sentinel-2-l2a, landsat-c2-l2, ...")],
        bbox: Annotated[Optional[str], typer.Option("--bbox", help="MINLON,MINLAT,MAXLON,MAXLAT in degrees (EPSG:4326).")] = None,
        intersects: Annotated[Optional[Path], typer.Option("--intersects", help="GeoJSON file (geometry, Feature or FeatureCollection) to search within, instead of --bbox.")] = None,
        datetime: Annotated[Optional[str], typer.Option("--datetime", help="RFC 3339 date, date-time or interval START/END ('..' = open), e.g. 2024-06-01/2024-08-31.")] = None,
        max_cloud: Annotated[Optional[float], typer.Option("--max-cloud", help="Skip items whose eo:cloud_cover exceeds this percentage (0..100).")] = None,
        limit: Annotated[Optional[int], typer.Option("--limit", help="Index at most this many items.")] = None,
        sensor: Annotated[Optional[str], typer.Option(help="Band table (default: from the collection id).")] = None,
        bands: Annotated[Optional[str], typer.Option(help="Bands to index, comma-separated (default: the sensor's surface bands).")] = None,
        size: Annotated[int, typer.Option("--size", help="Chip size in pixels.")] = 128,
        stride: Annotated[Optional[int], typer.Option("--stride", help="Grid stride in pixels (default: the chip size).")] = None,
        encoder: cli.EncoderOpt = "rcf",
        kernels: cli.KernelsOpt = None,
        features: cli.FeaturesOpt = None,
        kernel_size: cli.KernelSizeOpt = None,
        seed: cli.SeedOpt = None,
        checkpoint: cli.CheckpointOpt = None,
        pooling: cli.PoolingOpt = None,
        no_latlon: cli.NoLatLonOpt = False,
        no_time: cli.NoTimeOpt = False,
        bias: cli.BiasOpt = None,
        band_stats: cli.BandStatsOpt = False,
        max_nodata: Annotated[float, typer.Option("--max-nodata", help="Skip chips with more nodata than this fraction.")] = 0.5,
        max_chip_cloud: Annotated[Optional[float], typer.Option("--max-chip-cloud", help="Skip chips whose cloud fraction (from SCL / QA_PIXEL) exceeds this (0..1).")] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", help="Chips per encoder batch.")] = 32,
        read_workers: Annotated[int, typer.Option("--read-workers", help="Items read at once, each by its own thread (reads wait on the network).")] = 4,
        device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: a GPU when there is one).")] = None,
        db: cli.DbOption = None,
        table: cli.TableOption = "chips",
        as_json: cli.JsonOption = False,
        progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
        cluster: cli.ClusterOption = None,
        scheduler: cli.SchedulerOption = None,
        storage_option: cli.StorageOption = None,
    ) -> None:
        """Index the items of a STAC API search (Earth Search, Planetary Computer, ...)."""
        from chipscout.indexer.chips import ChipGrid
        from chipscout.indexer.errors import ChipscoutError
        from chipscout.indexer.sources.stac import StacQuery, StacSearch, index_search

        if max_chip_cloud is not None and not 0.0 <= max_chip_cloud <= 1.0:
            raise ChipscoutError(f"--max-chip-cloud must be within 0..1, got {max_chip_cloud}")
        if read_workers < 1:
            raise ChipscoutError(f"--read-workers must be at least 1, got {read_workers}")
        query = StacQuery.build(url, collection, bbox=bbox, intersects=intersects, datetime=datetime,
                                max_cloud_cover=max_cloud, max_items=limit)
        choice = cli.encoder_choice(encoder, kernels, features, kernel_size, seed, checkpoint, pooling,
                                    no_latlon, no_time, bias=bias, band_stats=band_stats)
        grid = ChipGrid(size, stride or size)
        search = StacSearch(query, sensor=sensor)
        if search.unsigned_warning:
            typer.secho(f"warning: {search.unsigned_warning}", fg="yellow", err=True)
        cluster_options = {"indexer": lambda sources, **options: cli.run_index(sources, cluster, scheduler, **options)}
        if not (cluster or scheduler):
            cluster_options["read_workers"] = read_workers  # a cluster reads one item per worker task
        summary = index_search(
            search, db_uri=cli._db(db), table_name=table, encoder=choice, grid=grid,
            bands=cli._split(bands), max_nodata_fraction=max_nodata,
            max_cloud_fraction=max_chip_cloud, batch_size=batch_size, device=device,
            progress=progress and not as_json, storage_options=cli._storage_options(storage_option),
            **cluster_options,
            run_request={"command": "chipscout index stac", "argv": sys.argv[1:]})
        stats = search.stats
        if as_json:
            cli._print_json({**summary.to_dict(), "stac": stats.to_dict()})
            for failure in summary.failures:
                typer.secho(f"failed: {failure['source']}: {failure['reason']}", fg="red", err=True)
            if summary.failures:
                raise typer.Exit(2)
            return
        typer.echo(f"{query.collection}: {stats.items_matched} item(s) found, {stats.items_yielded} read, "
                   f"{stats.items_over_cloud} over --max-cloud, {len(summary.failures)} failure(s)")
        cli._report_summary(summary, as_json=False)

    return index_stac
