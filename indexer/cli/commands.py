"""`chipscout`: index imagery, search it, inspect tables, run the demo and the app.

Every command takes `--db` (default: a per-user data directory, or $CHIPSCOUT_DB) and `--table`
where it applies; commands that print results take `--json`. Errors print as one red line and
exit non-zero.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from chipscout.indexer.cli.change import change_command
from chipscout.indexer.cli.importing import import_command
from chipscout.indexer.cli.index import index_app
from chipscout.indexer.cli.label import export_command, label_app
from chipscout.indexer.cli.thumbnails import thumbnails_command
from chipscout.indexer.cli.where import (CellOpt, HeatmapSourceOpt, PoolOpt, RankByCellOpt, WhereFormatOpt, WhereOpt,
                                         search_where_command, wanted)
from chipscout.indexer.cli.options import (BandStatsOpt, BiasOpt, CheckpointOpt, DbOption, EncoderOpt, FeaturesOpt,
                                           JsonOption, KernelSizeOpt, KernelsOpt, MemoryOption, PoolingOpt, SeedOpt,
                                           SearchClusterOption, SearchSchedulerOption, StorageOption, TableOption,
                                           IndexTableOption, db_uri, default_table, encoder_choice, print_json,
                                           report_summary, split, storage_options)
from chipscout.indexer.errors import ChipscoutError

app = typer.Typer(
    name="chipscout",
    help="Similarity search for satellite imagery: index chips, find look-alikes, label seed sets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(index_app, name="index")
app.command("import")(import_command)
app.command("thumbnails")(thumbnails_command)
app.command("change")(change_command)


# ----------------------------------------------------------------------------- search / info
@app.command()
@default_table
def search(
    chip_id: Annotated[Optional[str], typer.Argument(help="The example chip's id (or give --at).")] = None,
    at: Annotated[Optional[str], typer.Option("--at", help="Use the chip at LON,LAT (or the one covering most of MINLON,MINLAT,MAXLON,MAXLAT) as the example.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Number of neighbours.")] = 10,
    date_from: Annotated[Optional[str], typer.Option("--from", help="Earliest acquisition date.")] = None,
    date_to: Annotated[Optional[str], typer.Option("--to", help="Latest acquisition date (inclusive).")] = None,
    bbox: Annotated[Optional[str], typer.Option(help="MINLON,MINLAT,MAXLON,MAXLAT.")] = None,
    max_cloud: Annotated[Optional[float], typer.Option("--max-cloud", help="Maximum cloud fraction 0..1.")] = None,
    max_nodata: Annotated[Optional[float], typer.Option("--max-nodata", help="Maximum nodata fraction 0..1.")] = None,
    exclude_overlapping: Annotated[bool, typer.Option("--exclude-overlapping", help="Drop chips overlapping the query chip.")] = False,
    expand: Annotated[Optional[int], typer.Option("--expand", help="Query expansion: fold this many nearest results into the query and search again. Default: the table's (5 for RCF tables, else 0); 0 = the plain nearest neighbours.")] = None,
    spread_km: Annotated[float, typer.Option("--spread-km", help="Spread the results: at most --per-cell per grid cell of this size in km; 0 turns spreading off.")] = 0.0,
    per_cell: Annotated[int, typer.Option("--per-cell", help="Results per grid cell when spreading (--spread-km).")] = 1,
    where: WhereOpt = None,
    where_format: WhereFormatOpt = "both",
    heatmap_source: HeatmapSourceOpt = "auto",
    rank_by_cell: RankByCellOpt = False,
    pool: PoolOpt = None,
    cell: CellOpt = None,
    db: DbOption = None,
    table: TableOption = None,
    as_json: JsonOption = False,
    storage_option: StorageOption = None,
    memory: MemoryOption = None,
    cluster: SearchClusterOption = None,
    scheduler: SearchSchedulerOption = None,
) -> None:
    """Find the chips most similar to CHIP_ID (or to the chip at --at LON,LAT; with --where: and where inside each one)."""
    from chipscout.indexer.search import SearchEngine, SearchFilters, Spread

    if (chip_id is None) == (at is None):
        raise ChipscoutError("give the example as a CHIP_ID or as --at LON,LAT, one of the two")
    filters = SearchFilters.build(date_from, date_to, bbox, max_cloud, max_nodata, exclude_overlapping)
    spread = Spread(spread_km, per_cell) if spread_km else None
    with SearchEngine(db_uri(db), table, storage_options=storage_options(storage_option),
                      cluster=cluster, scheduler=scheduler, memory=memory) as engine:
        if at is not None:
            chip_id = engine.chip_at(at).chip_id
        if wanted(where, rank_by_cell, cell):
            search_where_command(engine, chip_id, k, filters, expand, spread, where=where, where_format=where_format,
                                 heatmap_source=heatmap_source, rank_by_cell=rank_by_cell, pool=pool, cell=cell,
                                 as_json=as_json)
            return
        response = engine.similar_to_chip(chip_id, k, filters, expand=expand, spread=spread)
    if as_json:
        print_json(response.to_dict())
        return
    typer.echo(f"neighbours of {chip_id} ({len(response.results)} in {response.elapsed_ms:.1f} ms, "
               f"{'ANN index' if response.used_index else 'exact search'}"
               f"{f', query expanded with {response.expansion} results' if response.expansion else ''})")
    typer.echo(f"{'rank':>4}  {'similarity':>10}  {'lon':>9}  {'lat':>8}  {'date':10}  chip_id")
    for r in response.results:
        when = r.chip.acquired.date().isoformat() if r.chip.acquired else "unknown"
        typer.echo(f"{r.rank:>4}  {r.similarity:>10.4f}  {r.chip.center_lon:>9.4f}  "
                   f"{r.chip.center_lat:>8.4f}  {when:10}  {r.chip.chip_id}")


@app.command()
def info(
    db: DbOption = None,
    table: Annotated[Optional[str], typer.Option("--table", help="Chip table (default: the database's only one; with several, list them).")] = None,
    versions: Annotated[bool, typer.Option("--versions", help="List the table's versions (see `chipscout restore`).")] = False,
    runs: Annotated[bool, typer.Option("--runs", help="List every run recorded for the table: indexing, restores, cleanups.")] = False,
    as_json: JsonOption = False,
    storage_option: StorageOption = None,
    memory: MemoryOption = None,
) -> None:
    """Describe a table: rows, encoder, bands, normalisation, versions, indexes, recent runs."""
    from dataclasses import asdict

    from chipscout.indexer.store import ChipStore

    uri = db_uri(db)
    options = storage_options(storage_option)
    names = ChipStore(uri, "chips", options).table_names() if table is None else []
    if table is None and len(names) == 1:
        table = names[0]
    if table is None:
        if as_json:
            print_json({"db": uri, "tables": names})
        else:
            typer.echo(f"{uri}: {', '.join(names) if names else 'no tables'}")
        return
    from chipscout.indexer.store.indexes import parse_memory

    if memory is not None:
        parse_memory(memory)  # a bad size fails before the table is opened
    store = ChipStore(uri, table, options)
    if runs:
        _show_runs(store, as_json)
        return
    if versions:
        _show_versions(store, as_json)
        return
    from chipscout.indexer.store.runlog import list_runs
    from chipscout.indexer.store.indexes import index_status

    from chipscout.indexer.search import SearchEngine, default_expansion

    config = store.config
    recent = list_runs(store)
    expand = default_expansion(config.encoder, bool(config.transform))
    payload = {
        "db": uri, "table": table, "rows": store.count(), "version": store.version,
        "config": asdict(config), "default_expand": expand, "indexes": store.index_description(),
        "index": index_status(store),
        "runs_recorded": len(recent), "recent_runs": [r.to_dict() for r in recent[:3]],
        "warm": SearchEngine(uri, table, storage_options=options, memory=memory).warm_plan(),
    }
    if as_json:
        print_json(payload)
        return
    typer.echo(f"table {table} in {uri}: {payload['rows']} chips, version {payload['version']}")
    typer.echo(f"  encoder   {config.encoder_label} ({config.encoder}) {json.dumps(config.encoder_config)}")
    typer.echo(f"  vectors   {config.embedding_dim}-d, {config.metric}, state sha256 {config.state_sha256[:12]}")
    if config.transform:
        raw = "raw vectors kept (`chipscout refit`)" if "raw_vector" in store.schema.names else \
            "no raw vectors (made before chipscout kept them)"
        typer.echo(f"  transform {config.transform.get('spec')}: {config.encoder_dim}-d -> "
                   f"{config.embedding_dim}-d, fitted on {config.transform.get('fit_vectors')} vectors; {raw}")
    else:
        typer.echo("  transform none (L2-normalised encoder vectors)")
    typer.echo(f"  search    query expansion {expand} by default" if expand else
               "  search    plain nearest neighbours by default (no query expansion)")
    typer.echo(f"  sensor    {config.sensor}: {', '.join(config.bands)}")
    typer.echo(f"  scaling   {config.normalization.kind}")
    typer.echo(f"  chips     {config.chip_size_px} px, stride {config.chip_stride_px} px")
    typer.echo(f"  written   by chipscout {config.chipscout_version}, created {config.created_at}")
    for line in _index_lines(payload["index"]):
        typer.echo(line)
    warm = payload["warm"]
    typer.echo(f"  warm      under {_size(warm['budget_bytes'])}: vectors {warm['tier']}, "
               f"{'k-means lists (partitions)' if warm.get('partitions') else 'sketch yes' if warm['sketch'] else 'sketch no'}, result columns {'held' if warm['records'] else 'from disk'}; "
               f"{_size(warm['bytes'])} ({', '.join(f'{k} {_size(v)}' for k, v in warm['parts'].items())}); {warm['why']}")
    if recent:
        from chipscout.indexer.store.runlog import describe

        typer.echo(f"  runs      {len(recent)} recorded, latest first (all: --runs; versions: --versions)")
        for run in recent[:3]:
            typer.echo(f"    {describe(run)}")


def _size(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _index_lines(status: dict[str, Any]) -> list[str]:
    from chipscout.indexer.store.indexes import DEFAULT_POLICY

    vector = status["vector"]
    if vector is None:
        lines = [f"  vector    no index: exact search (built from {DEFAULT_POLICY.min_rows} rows "
                 "on ingest, or by `chipscout optimize`)"]
    else:
        size = f", {vector['size_bytes'] / 2**20:.0f} MiB" if vector.get("size_bytes") else ""
        lines = [f"  vector    {vector['index_type']} ({vector['distance_type']}), "
                 f"{vector['num_indexed_rows']} rows indexed, {vector['num_unindexed_rows']} not yet{size}"]
        built = vector.get("chipscout")
        if built:
            params = ", ".join(f"{k} {v}" for k, v in built["params"].items() if k != "index_type")
            query = ", ".join(f"{k} {v}" for k, v in built["query"].items())
            lines.append(f"            {params}; query {query}")
            lines.append(f"            built {built['built_at']} in {built['build_s']:.1f} s on "
                         f"{built['rows_at_build']} rows (lancedb {built['lancedb_version']})")
        else:
            lines.append(f"            created {vector.get('created_at')} outside chipscout; "
                         f"details {json.dumps(vector.get('details'))}")
    scalar = status["scalar"]
    lines.append(f"  filters   {'BTREE on ' + ', '.join(scalar) if scalar else 'no scalar indexes (scan)'}")
    fragments = status["fragments"]
    lines.append(f"  storage   {fragments['num_fragments']} fragments ({fragments['num_small_fragments']} small), "
                 f"{fragments['total_bytes'] / 2**20:.0f} MiB")
    return lines


@app.command()
@default_table
def optimize(
    index_type: Annotated[Optional[str], typer.Option("--index-type", help="IVF_RQ (default), IVF_PQ or IVF_HNSW_SQ; another type than the table's rebuilds it.")] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Retrain the vector index even if it is current.")] = False,
    db: DbOption = None,
    table: TableOption = None,
    as_json: JsonOption = False,
) -> None:
    """Compact the table and build or update its vector and filter indexes."""
    from chipscout.indexer.store import ChipStore
    from chipscout.indexer.store.indexes import DEFAULT_POLICY, VECTOR_INDEX_TYPES, maintain_indexes

    if index_type is not None and index_type.upper() not in VECTOR_INDEX_TYPES:
        raise ChipscoutError(f"unknown index type {index_type!r}; choose one of {', '.join(VECTOR_INDEX_TYPES)}")
    store = ChipStore(db_uri(db), table)
    store.ensure_exists()  # the missing-table error, with the tables there are
    # Rows of one chip id twice (two writers at once on an object store, or chipscout before the
    # writer lock) go first, in one commit, so the indexes are built on one row per chip.
    duplicates = store.remove_duplicates()
    report = maintain_indexes(store, DEFAULT_POLICY, index_type=index_type.upper() if index_type else None,
                              rebuild=rebuild, compact=True)
    if as_json:
        print_json({**report.to_dict(), "duplicates_removed": duplicates})
        return
    vector = {"none": f"no vector index (exact search below {DEFAULT_POLICY.min_rows} rows)",
              "built": f"vector index built in {report.vector_build_s:.1f} s",
              "rebuilt": f"vector index rebuilt in {report.vector_build_s:.1f} s",
              "updated": "new rows added to the vector index",
              "current": "vector index current"}[report.vector_index]
    if report.scalar_indexes_built:
        scalar = f"filter indexes built on {', '.join(report.scalar_indexes_built)}"
    elif report.rows < DEFAULT_POLICY.scalar_min_rows:
        scalar = f"no filter indexes below {DEFAULT_POLICY.scalar_min_rows} rows"
    else:
        scalar = "filter indexes current"
    repaired = f"{duplicates} duplicate rows removed; " if duplicates else ""
    typer.echo(f"{table}: {report.rows} rows; {repaired}compacted; {scalar}; {vector} ({report.elapsed_s:.1f} s)")


@app.command()
@default_table
def refit(
    into: Annotated[str, typer.Option("--into", help="Name of the new table to write (must not exist).")],
    transform: Annotated[str, typer.Option("--transform", help="Transform spec to fit (see `chipscout eval --transform`), or 'default' for the encoder family's measured default.")] = "default",
    sample: Annotated[int, typer.Option("--sample", help="Fit on a seeded sample of this many raw vectors (0: all of them).")] = 100_000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample.")] = 0,
    db: DbOption = None,
    table: TableOption = None,
    as_json: JsonOption = False,
) -> None:
    """Fit a new vector transform on a table's raw encoder vectors and write every chip, with its
    new vector, into a new table (the source table is not changed). No imagery is read."""
    from tqdm import tqdm

    from chipscout.indexer.ingest.refit import refit_table
    from chipscout.indexer.store import ChipStore

    if sample < 0:
        raise ChipscoutError(f"--sample must be 0 (all) or a number of vectors >= 2, got {sample}")
    total = ChipStore(db_uri(db), table).count()
    with tqdm(total=total, unit="chip", desc=f"refit {table} -> {into}", disable=as_json) as bar:
        report = refit_table(db_uri(db), table, into, transform, sample=sample or None, seed=seed,
                             progress=lambda written: bar.update(written - bar.n))
    if as_json:
        print_json(report.to_dict())
        return
    typer.echo(f"{into}: {report.rows} chips, transform {report.spec} (was {report.previous_spec}), "
               f"fitted on {report.fit_vectors} raw vectors, {report.output_dim}-d; "
               f"index: {report.index.get('vector_index')} ({report.seconds:.1f} s). "
               f"Search it with --table {into}; {table} is unchanged.")


def _show_runs(store, as_json: bool) -> None:
    from chipscout.indexer.store.runlog import describe, list_runs

    runs = list_runs(store)
    if as_json:
        print_json({"db": store.db_uri, "table": store.table_name, "runs": [r.to_dict() for r in runs]})
        return
    if not runs:
        typer.echo(f"no runs recorded for table {store.table_name}")
    for run in runs:
        typer.echo(describe(run))
        failures = run.result.get("failures", [])
        for failure in failures[:5]:
            typer.echo(f"    failed: {failure.get('source')}: {failure.get('reason')}")
        if len(failures) > 5:
            typer.echo(f"    ... and {len(failures) - 5} more failures (--json lists them all)")


def _show_versions(store, as_json: bool) -> None:
    versions = store.versions()
    current = store.version
    if as_json:
        print_json({"db": store.db_uri, "table": store.table_name, "current": current,
                     "versions": [{"version": v["version"], "timestamp": v["timestamp"],
                                   "rows": int(v.get("metadata", {}).get("total_rows", 0))}
                                  for v in versions]})
        return
    typer.echo(f"versions of {store.table_name} (current {current}; go back with "
               "`chipscout restore --version N`):")
    for v in versions:
        rows = v.get("metadata", {}).get("total_rows", "?")
        mark = "  <- current" if v["version"] == current else ""
        typer.echo(f"  {v['version']:>6}  {v['timestamp']:%Y-%m-%d %H:%M:%S}  {rows:>9} rows{mark}")


@app.command()
@default_table
def restore(
    version: Annotated[int, typer.Option("--version", help="The version to go back to (see `chipscout info --versions`).")],
    db: DbOption = None,
    table: TableOption = None,
    as_json: JsonOption = False,
) -> None:
    """Make an earlier version of a table current again (as a new version; nothing is deleted)."""
    from chipscout.indexer.store.runlog import record_action
    from chipscout.indexer.store import ChipStore

    store = ChipStore(db_uri(db), table)
    before = store.version
    current = store.restore(version)
    rows = store.count()
    record_action(store, "restore", {"version": version},
                  {"restored_version": version, "new_version": current, "rows": rows}, before)
    if as_json:
        print_json({"table": table, "restored_version": version, "version": current, "rows": rows})
    else:
        typer.echo(f"{table}: restored version {version} as version {current} ({rows} chips)")


@app.command()
@default_table
def cleanup(
    older_than: Annotated[float, typer.Option("--older-than", help="Delete versions older than this many days (0: all but the current one).")],
    delete_unverified: Annotated[bool, typer.Option("--delete-unverified", help="Also delete files of writes that never committed (killed runs) younger than 7 days; only when nothing is writing.")] = False,
    db: DbOption = None,
    table: TableOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete a table's old versions (and compact its files). Readers on a deleted version fail."""
    from chipscout.indexer.store.runlog import record_action
    from chipscout.indexer.store import ChipStore

    if not older_than >= 0:
        raise ChipscoutError(f"--older-than must be a number of days >= 0, got {older_than}")
    store = ChipStore(db_uri(db), table)
    before = store.version
    report = store.cleanup(older_than * 86400.0, delete_unverified=delete_unverified)
    record_action(store, "cleanup", {"older_than_days": older_than,
                                     "delete_unverified": delete_unverified}, report, before)
    if as_json:
        print_json({"table": table, **report})
    else:
        typer.echo(f"{table}: {report['versions_before']} -> {report['versions_after']} versions "
                   f"(table and companions), {report['bytes_before'] / 1e6:.1f} -> "
                   f"{report['bytes_after'] / 1e6:.1f} MB on disk")


# ----------------------------------------------------------------------------- eval
@app.command("eval")
def evaluate(
    path: Annotated[Path, typer.Argument(help="Folder laid out PATH/<class>/<image>.")],
    encoder: EncoderOpt = "rcf",
    kernels: KernelsOpt = None,
    features: FeaturesOpt = None,
    kernel_size: KernelSizeOpt = None,
    seed: SeedOpt = None,
    checkpoint: CheckpointOpt = None,
    pooling: PoolingOpt = None,
    sensor: Annotated[Optional[str], typer.Option(help="Band table (default: from the files).")] = None,
    bands: Annotated[Optional[str], typer.Option(help="Bands to use, comma-separated.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    device: Annotated[Optional[str], typer.Option()] = None,
    transform: Annotated[Optional[list[str]], typer.Option(
        "--transform", help="Compare vector transforms side by side (repeatable): a spec such as "
                            "'power:0.4,standardize,pca-whiten:64:10,l2', 'default' or 'none'. "
                            "The table always has the band-stats baseline and the raw vectors.")] = None,
    expand: Annotated[Optional[list[int]], typer.Option(
        "--expand", help="Query expansion (repeatable when comparing transforms). Default: as a "
                         "search of this encoder's table does (5 for rcf, else 0), and when "
                         "comparing, also without (0).")] = None,
    bias: BiasOpt = None,
    band_stats: BandStatsOpt = False,
    as_json: JsonOption = False,
) -> None:
    """Leave-one-out retrieval quality (precision@k, mAP) on a labelled folder, each image embedded
    as indexing embeds a chip (the encoder's input scaling, the files' GSD) and ranked as a search
    of its table ranks (the family's default transform and query expansion). --transform compares
    transforms side by side instead, with the band-stats baseline and the raw vectors."""
    from chipscout.indexer.evaluate.retrieval import compare_transforms, evaluate_folder, format_comparison, format_report

    choice = encoder_choice(encoder, kernels, features, kernel_size, seed, checkpoint, pooling,
                            False, False, bias=bias, band_stats=band_stats)
    if transform:
        rows = compare_transforms(path, transform, encoder=choice.name, encoder_params=choice.params,
                                  sensor=sensor, bands=split(bands), batch_size=batch_size,
                                  device=device, progress=not as_json, expands=expand or None)
        if as_json:
            print_json([{"encoder": r.encoder, "transform": r.transform, "dim": r.output_dim,
                          "expand": r.expand,
                          "precision_at_k": {str(k): v for k, v in r.scores.precision_at_k.items()},
                          "map": r.scores.mean_average_precision} for r in rows])
        else:
            typer.echo(format_comparison(rows, (1, 5, 10)))
        return
    if expand and len(expand) > 1:
        raise typer.BadParameter("one --expand without --transform (the report ranks one way)",
                                 param_hint="--expand")
    report = evaluate_folder(path, encoder=choice.name, encoder_params=choice.params, sensor=sensor,
                             bands=split(bands), batch_size=batch_size, device=device,
                             progress=not as_json, expand=expand[0] if expand else None)
    if as_json:
        print_json(report.to_dict())
    else:
        typer.echo(format_report(report))


# ----------------------------------------------------------------------------- app / demo
def launch_app(db_uri: str, table: str, port: int, address: str,
               storage_options: dict[str, str] | None = None, memory: str | None = None) -> None:
    import os

    from chipscout.indexer.store import STORAGE_OPTIONS_ENV

    env = None
    if storage_options:  # the app's stores read them from the environment
        env = {**os.environ, STORAGE_OPTIONS_ENV: json.dumps(storage_options)}
    from chipscout.app import streamlit_command

    command = streamlit_command(db_uri, table, port, address, memory=memory)
    typer.echo(f"chipscout app on http://{address}:{port}  (Ctrl+C to stop)")
    if os.name == "posix":
        # Become the server: a supervisor's SIGTERM (`docker stop`) or Ctrl+C then reaches Streamlit
        # itself, rather than ending this process and leaving the server holding the port.
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, command, env if env is not None else os.environ)
    try:
        subprocess.run(command, check=False, env=env)
    except KeyboardInterrupt:
        pass


@app.command("app")
@default_table
def run_app(
    db: DbOption = None,
    table: TableOption = None,
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8501,
    address: Annotated[str, typer.Option(help="Address to bind (default: this machine only).")] = "127.0.0.1",
    storage_option: StorageOption = None,
    memory: MemoryOption = None,
) -> None:
    """Serve the Streamlit app over a chip table."""
    if memory is not None:
        from chipscout.indexer.store.indexes import parse_memory

        parse_memory(memory)  # one red line here, not a traceback in the browser
    launch_app(db_uri(db), table, port, address, storage_options(storage_option), memory=memory)


@app.command()
def demo(
    no_app: Annotated[bool, typer.Option("--no-app", help="Only prepare and index the demo scene.")] = False,
    db: DbOption = None,
    table: IndexTableOption = "demo",
    port: Annotated[int, typer.Option(help="Port for the app.")] = 8501,
    as_json: JsonOption = False,
) -> None:
    """Index the bundled real Sentinel-2 scene (Virginia Eastern Shore) and serve the app."""
    if not as_json:  # the first line at once: loading torch and preparing the scene take seconds
        typer.echo(f"chipscout demo: indexing the bundled Sentinel-2 scene into table {table!r} of "
                   f"{db_uri(db)} (576 chips; about 1 minute on 2 idle cores, a few under load); "
                   "loading the encoder...", err=True)
    from chipscout.indexer.ingest import run_demo

    summary = run_demo(db_uri(db), table, progress=not as_json)
    report_summary(summary, as_json)
    if not no_app:
        launch_app(db_uri(db), table, port, "127.0.0.1")


app.add_typer(label_app, name="label")
app.command("export")(export_command)


def main(argv: list[str] | None = None) -> None:
    """Run `chipscout` with `argv` (default: the process's arguments); exits like the command."""
    try:
        app(args=argv, prog_name="chipscout")
    except Exception as err:
        if not _is_user_error(err):
            raise
        typer.secho(f"error: {err}", fg="red", err=True)
        sys.exit(1)


def _is_user_error(err: Exception) -> bool:
    """A ChipscoutError or an encoder's EncoderError. The encoders package imports torch, so it is
    looked up only if a command already imported it: an EncoderError cannot be raised otherwise,
    and `chipscout --help`, search, info, label and export start without torch."""
    if isinstance(err, ChipscoutError):
        return True
    encoder_errors = sys.modules.get("chipscout.encoders.errors")
    return encoder_errors is not None and isinstance(err, encoder_errors.EncoderError)


if __name__ == "__main__":
    main()
