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

from chipscout.encoders.base import EncoderError
from chipscout.indexer.errors import ChipscoutError

app = typer.Typer(
    name="chipscout",
    help="Similarity search for satellite imagery: index chips, find look-alikes, label seed sets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
index_app = typer.Typer(help="Embed imagery into a chip table.", no_args_is_help=True)
app.add_typer(index_app, name="index")

DbOption = Annotated[Optional[str], typer.Option("--db", help="LanceDB database (folder or s3:// URI). Default: $CHIPSCOUT_DB or ~/.local/share/chipscout/db.")]
TableOption = Annotated[str, typer.Option("--table", help="Chip table name.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
StorageOption = Annotated[Optional[list[str]], typer.Option("--storage-option", help="Object-store option KEY=VALUE for --db s3://... (repeatable), e.g. aws_endpoint=http://127.0.0.1:9000, allow_http=true; credentials also come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION.")]
ClusterOption = Annotated[Optional[str], typer.Option("--cluster", help="Index on a Dask cluster of worker processes on this machine: local (one per core) or local:N.")]
SchedulerOption = Annotated[Optional[str], typer.Option("--scheduler", help="Index on a running Dask cluster: its scheduler, tcp://HOST:PORT.")]


def _db(db: str | None) -> str:
    from chipscout.indexer.paths import default_db_uri

    return db or default_db_uri()


def _print_json(payload: Any) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str))


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _storage_options(pairs: list[str] | None) -> dict[str, str] | None:
    """`--storage-option KEY=VALUE` options as a dict (None when none were given)."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ChipscoutError(f"bad --storage-option {pair!r}: expected KEY=VALUE, e.g. allow_http=true")
        options[key.strip()] = value.strip()
    return options or None


def run_index(sources, cluster: str | None, scheduler: str | None, **options):
    """`index_sources`, or `index_on_cluster` when --cluster or --scheduler is given."""
    if cluster or scheduler:
        from chipscout.indexer.ingest.cluster import index_on_cluster

        return index_on_cluster(sources, cluster=cluster, scheduler=scheduler, **options)
    from chipscout.indexer.ingest.pipeline import index_sources

    return index_sources(sources, **options)


# ----------------------------------------------------------------------------- encoder options
EncoderOpt = Annotated[str, typer.Option("--encoder", help="rcf, band-stats, clay-v1-base, clay-v1.5-large, clay-tiny.")]
KernelsOpt = Annotated[Optional[str], typer.Option("--kernels", help="RCF kernels: empirical (default; fitted on a sample of the data) or gaussian (the Planetary Computer tutorial's: 3x3, bias -1).")]
FeaturesOpt = Annotated[Optional[int], typer.Option("--features", help="RCF features (even; default 1024).")]
KernelSizeOpt = Annotated[Optional[int], typer.Option("--kernel-size", help="RCF kernel size in pixels (default 5 for empirical kernels, 3 for gaussian).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed of the encoder.")]
CheckpointOpt = Annotated[Optional[Path], typer.Option("--checkpoint", help="Clay checkpoint (.ckpt or state dict).")]
PoolingOpt = Annotated[Optional[str], typer.Option("--pooling", help="MAE pooling: cls, mean or patch.")]
NoLatLonOpt = Annotated[bool, typer.Option("--no-latlon", help="MAE: ignore location (location-agnostic search).")]
NoTimeOpt = Annotated[bool, typer.Option("--no-time", help="MAE: ignore acquisition time.")]
BiasOpt = Annotated[Optional[float], typer.Option("--bias", help="RCF bias, in reflectance (default -0.2 for empirical kernels, -1 for gaussian).")]
BandStatsOpt = Annotated[bool, typer.Option("--band-stats", help="RCF: append each band's mean and standard deviation to the vector.")]


def encoder_choice(name: str, kernels: str | None, features: int | None, kernel_size: int | None,
                   seed: int | None, checkpoint: Path | None, pooling: str | None,
                   no_latlon: bool, no_time: bool, *, bias: float | None = None,
                   band_stats: bool = False):
    """The encoder and the options the user gave; an option this encoder does not take is refused."""
    from chipscout.encoders.base import encoder_parameters
    from chipscout.indexer.ingest.pipeline import EncoderChoice

    given: dict[str, Any] = {
        "kernels": kernels, "features": features, "kernel_size": kernel_size, "seed": seed,
        "checkpoint": str(checkpoint) if checkpoint else None, "pooling": pooling,
        "use_latlon": False if no_latlon else None, "use_time": False if no_time else None,
        "bias": bias, "band_stats": True if band_stats else None,
    }
    accepted = encoder_parameters(name)
    params = {}
    for key, value in given.items():
        if value is None:
            continue
        if key not in accepted:
            flag = "--" + key.replace("_", "-").replace("use-", "no-")
            raise ChipscoutError(f"encoder {name} does not take {flag}")
        params[key] = value
    return EncoderChoice(name, params)


# ----------------------------------------------------------------------------- index
@index_app.command("files")
def index_files(
    paths: Annotated[list[Path], typer.Argument(help="Multi-band rasters, or folders of single-band files (one scene each).")],
    sensor: Annotated[str, typer.Option(help="Band table to use: sentinel-2-l1c, sentinel-2-l2a, landsat-c2-l2, naip, rgb8.")] = "sentinel-2-l2a",
    file_bands: Annotated[Optional[str], typer.Option("--file-bands", help="Band names of a multi-band file, in file order (e.g. B02,B03,B04,B08).")] = None,
    bands: Annotated[Optional[str], typer.Option(help="Bands to index, comma-separated (default: the sensor's surface bands).")] = None,
    date: Annotated[Optional[str], typer.Option(help="Acquisition date (RFC 3339) when the files do not say.")] = None,
    source_id: Annotated[Optional[str], typer.Option("--source-id", help="Source id (one path only); default: the file or folder name.")] = None,
    size: Annotated[int, typer.Option("--size", help="Chip size in pixels.")] = 128,
    stride: Annotated[Optional[int], typer.Option("--stride", help="Grid stride in pixels (default: the chip size).")] = None,
    encoder: EncoderOpt = "rcf",
    kernels: KernelsOpt = None,
    features: FeaturesOpt = None,
    kernel_size: KernelSizeOpt = None,
    seed: SeedOpt = None,
    checkpoint: CheckpointOpt = None,
    pooling: PoolingOpt = None,
    no_latlon: NoLatLonOpt = False,
    no_time: NoTimeOpt = False,
    bias: BiasOpt = None,
    band_stats: BandStatsOpt = False,
    max_nodata: Annotated[float, typer.Option("--max-nodata", help="Skip chips with more nodata than this fraction.")] = 0.5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Chips per encoder batch.")] = 32,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: a GPU when there is one).")] = None,
    db: DbOption = None,
    table: TableOption = "chips",
    as_json: JsonOption = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    commit_every: Annotated[int, typer.Option("--commit-every", help="Chips per atomic commit; a killed run loses at most this many.")] = 512,
    resume: Annotated[bool, typer.Option("--resume", help="Finish an interrupted run. Always on: chips already stored are skipped without being read.")] = False,
    cluster: ClusterOption = None,
    scheduler: SchedulerOption = None,
    storage_option: StorageOption = None,
    transform: Annotated[Optional[str], typer.Option("--transform", help="Vector transform of a new table: a spec such as 'power:0.4,standardize,pca-whiten:64:10,l2', 'none', or 'default' (the encoder family's measured default). Appends reuse the table's.")] = None,
) -> None:
    """Index local GeoTIFF/COG files (resumes where an earlier run stopped)."""
    from chipscout.indexer.chips import ChipGrid
    from chipscout.indexer.geo import parse_datetime
    from chipscout.indexer.sources.files import local_source

    if source_id and len(paths) > 1:
        raise ChipscoutError("--source-id names one source; give one path with it")
    acquired = parse_datetime(date, "--date") if date else None
    sources = [local_source(p, sensor=sensor, file_bands=_split(file_bands), acquired=acquired,
                            source_id=source_id) for p in paths]
    choice = encoder_choice(encoder, kernels, features, kernel_size, seed, checkpoint, pooling,
                            no_latlon, no_time, bias=bias, band_stats=band_stats)
    summary = run_index(
        sources, cluster, scheduler, db_uri=_db(db), table_name=table, encoder=choice,
        grid=ChipGrid(size, stride or size), bands=_split(bands), max_nodata_fraction=max_nodata,
        batch_size=batch_size, commit_every=commit_every, device=device,
        progress=progress and not as_json, storage_options=_storage_options(storage_option),
        run_request={"command": "chipscout index files", "argv": sys.argv[1:]},
        **({"transform": transform} if transform else {}))
    _report_summary(summary, as_json)


def _report_summary(summary, as_json: bool) -> None:
    if as_json:
        _print_json(summary.to_dict())
    else:
        typer.echo(
            f"{summary.table}: {summary.chips_new} new chips, {summary.chips_present} already present, "
            f"{summary.chips_skipped_nodata} skipped for nodata, {summary.chips_skipped_cloud} for cloud, "
            f"{summary.chips_failed} failed; "
            f"{summary.table_rows} rows in table (version {summary.table_version}); "
            f"{summary.chips_per_s:.1f} chips/s with {summary.encoder}")
    for failure in summary.failures:
        reason = failure["reason"]
        where = "" if reason.startswith(failure["source"]) else failure["source"] + ": "
        typer.secho(f"failed: {where}{reason}", fg="red", err=True)
    if summary.failures:
        raise typer.Exit(2)


# ----------------------------------------------------------------------------- search / info
@app.command()
def search(
    chip_id: Annotated[str, typer.Argument(help="The example chip's id.")],
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
    db: DbOption = None,
    table: TableOption = "chips",
    as_json: JsonOption = False,
    storage_option: StorageOption = None,
) -> None:
    """Find the chips most similar to CHIP_ID."""
    from chipscout.indexer.search import SearchEngine, SearchFilters, Spread

    filters = SearchFilters.build(date_from, date_to, bbox, max_cloud, max_nodata, exclude_overlapping)
    spread = Spread(spread_km, per_cell) if spread_km else None
    engine = SearchEngine(_db(db), table, storage_options=_storage_options(storage_option))
    response = engine.similar_to_chip(chip_id, k, filters, expand=expand, spread=spread)
    if as_json:
        _print_json(response.to_dict())
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
    table: Annotated[Optional[str], typer.Option("--table", help="Chip table (default: list the tables).")] = None,
    versions: Annotated[bool, typer.Option("--versions", help="List the table's versions (see `chipscout restore`).")] = False,
    runs: Annotated[bool, typer.Option("--runs", help="List every run recorded for the table: indexing, restores, cleanups.")] = False,
    as_json: JsonOption = False,
    storage_option: StorageOption = None,
) -> None:
    """Describe a table: rows, encoder, bands, normalisation, versions, indexes, recent runs."""
    from dataclasses import asdict

    from chipscout.indexer.store.table import ChipStore

    uri = _db(db)
    options = _storage_options(storage_option)
    if table is None:
        names = ChipStore(uri, "chips", options).table_names()
        if as_json:
            _print_json({"db": uri, "tables": names})
        else:
            typer.echo(f"{uri}: {', '.join(names) if names else 'no tables'}")
        return
    store = ChipStore(uri, table, options)
    if runs:
        _show_runs(store, as_json)
        return
    if versions:
        _show_versions(store, as_json)
        return
    from chipscout.indexer.store.runlog import list_runs
    from chipscout.indexer.store.indexes import index_status

    from chipscout.indexer.search import default_expansion

    config = store.config
    recent = list_runs(store)
    expand = default_expansion(config.encoder, bool(config.transform))
    payload = {
        "db": uri, "table": table, "rows": store.count(), "version": store.table.version,
        "config": asdict(config), "default_expand": expand, "indexes": store.index_description(),
        "index": index_status(store),
        "runs_recorded": len(recent), "recent_runs": [r.to_dict() for r in recent[:3]],
    }
    if as_json:
        _print_json(payload)
        return
    typer.echo(f"table {table} in {uri}: {payload['rows']} chips, version {payload['version']}")
    typer.echo(f"  encoder   {config.encoder_label} ({config.encoder}) {json.dumps(config.encoder_config)}")
    typer.echo(f"  vectors   {config.embedding_dim}-d, {config.metric}, state sha256 {config.state_sha256[:12]}")
    if config.transform:
        raw = "raw vectors kept (`chipscout refit`)" if "raw_vector" in store.table.schema.names else \
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
    if recent:
        from chipscout.indexer.store.runlog import describe

        typer.echo(f"  runs      {len(recent)} recorded, latest first (all: --runs; versions: --versions)")
        for run in recent[:3]:
            typer.echo(f"    {describe(run)}")


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
def optimize(
    index_type: Annotated[Optional[str], typer.Option("--index-type", help="IVF_RQ (default), IVF_PQ or IVF_HNSW_SQ; another type than the table's rebuilds it.")] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Retrain the vector index even if it is current.")] = False,
    db: DbOption = None,
    table: TableOption = "chips",
    as_json: JsonOption = False,
) -> None:
    """Compact the table and build or update its vector and filter indexes."""
    from chipscout.indexer.store.table import ChipStore
    from chipscout.indexer.store.indexes import DEFAULT_POLICY, VECTOR_INDEX_TYPES, maintain_indexes

    if index_type is not None and index_type.upper() not in VECTOR_INDEX_TYPES:
        raise ChipscoutError(f"unknown index type {index_type!r}; choose one of {', '.join(VECTOR_INDEX_TYPES)}")
    store = ChipStore(_db(db), table)
    store.table  # the missing-table error, with the tables there are
    report = maintain_indexes(store, DEFAULT_POLICY, index_type=index_type.upper() if index_type else None,
                              rebuild=rebuild, compact=True)
    if as_json:
        _print_json(report.to_dict())
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
    typer.echo(f"{table}: {report.rows} rows; compacted; {scalar}; {vector} ({report.elapsed_s:.1f} s)")


@app.command()
def refit(
    into: Annotated[str, typer.Option("--into", help="Name of the new table to write (must not exist).")],
    transform: Annotated[str, typer.Option("--transform", help="Transform spec to fit (see `chipscout eval --transform`), or 'default' for the encoder family's measured default.")] = "default",
    sample: Annotated[int, typer.Option("--sample", help="Fit on a seeded sample of this many raw vectors (0: all of them).")] = 100_000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample.")] = 0,
    db: DbOption = None,
    table: TableOption = "chips",
    as_json: JsonOption = False,
) -> None:
    """Fit a new vector transform on a table's raw encoder vectors and write every chip, with its
    new vector, into a new table (the source table is not changed). No imagery is read."""
    from tqdm import tqdm

    from chipscout.indexer.ingest.refit import refit_table
    from chipscout.indexer.store.table import ChipStore

    if sample < 0:
        raise ChipscoutError(f"--sample must be 0 (all) or a number of vectors >= 2, got {sample}")
    total = ChipStore(_db(db), table).count()
    with tqdm(total=total, unit="chip", desc=f"refit {table} -> {into}", disable=as_json) as bar:
        report = refit_table(_db(db), table, into, transform, sample=sample or None, seed=seed,
                             progress=lambda written: bar.update(written - bar.n))
    if as_json:
        _print_json(report.to_dict())
        return
    typer.echo(f"{into}: {report.rows} chips, transform {report.spec} (was {report.previous_spec}), "
               f"fitted on {report.fit_vectors} raw vectors, {report.output_dim}-d; "
               f"index: {report.index.get('vector_index')} ({report.seconds:.1f} s). "
               f"Search it with --table {into}; {table} is unchanged.")


def _show_runs(store, as_json: bool) -> None:
    from chipscout.indexer.store.runlog import describe, list_runs

    runs = list_runs(store)
    if as_json:
        _print_json({"db": store.db_uri, "table": store.table_name, "runs": [r.to_dict() for r in runs]})
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
    current = store.table.version
    if as_json:
        _print_json({"db": store.db_uri, "table": store.table_name, "current": current,
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
def restore(
    version: Annotated[int, typer.Option("--version", help="The version to go back to (see `chipscout info --versions`).")],
    db: DbOption = None,
    table: TableOption = "chips",
    as_json: JsonOption = False,
) -> None:
    """Make an earlier version of a table current again (as a new version; nothing is deleted)."""
    from chipscout.indexer.store.runlog import record_action
    from chipscout.indexer.store.table import ChipStore

    store = ChipStore(_db(db), table)
    before = store.table.version
    current = store.restore(version)
    rows = store.count()
    record_action(store, "restore", {"version": version},
                  {"restored_version": version, "new_version": current, "rows": rows}, before)
    if as_json:
        _print_json({"table": table, "restored_version": version, "version": current, "rows": rows})
    else:
        typer.echo(f"{table}: restored version {version} as version {current} ({rows} chips)")


@app.command()
def cleanup(
    older_than: Annotated[float, typer.Option("--older-than", help="Delete versions older than this many days (0: all but the current one).")],
    delete_unverified: Annotated[bool, typer.Option("--delete-unverified", help="Also delete files of writes that never committed (killed runs) younger than 7 days; only when nothing is writing.")] = False,
    db: DbOption = None,
    table: TableOption = "chips",
    as_json: JsonOption = False,
) -> None:
    """Delete a table's old versions (and compact its files). Readers on a deleted version fail."""
    from chipscout.indexer.store.runlog import record_action
    from chipscout.indexer.store.table import ChipStore

    if not older_than >= 0:
        raise ChipscoutError(f"--older-than must be a number of days >= 0, got {older_than}")
    store = ChipStore(_db(db), table)
    before = store.table.version
    report = store.cleanup(older_than * 86400.0, delete_unverified=delete_unverified)
    record_action(store, "cleanup", {"older_than_days": older_than,
                                     "delete_unverified": delete_unverified}, report, before)
    if as_json:
        _print_json({"table": table, **report})
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
                                  sensor=sensor, bands=_split(bands), batch_size=batch_size,
                                  device=device, progress=not as_json, expands=expand or None)
        if as_json:
            _print_json([{"encoder": r.encoder, "transform": r.transform, "dim": r.output_dim,
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
                             bands=_split(bands), batch_size=batch_size, device=device,
                             progress=not as_json, expand=expand[0] if expand else None)
    if as_json:
        _print_json(report.to_dict())
    else:
        typer.echo(format_report(report))


# ----------------------------------------------------------------------------- app / demo
def launch_app(db_uri: str, table: str, port: int, address: str,
               storage_options: dict[str, str] | None = None) -> None:
    import os

    from chipscout.indexer.store.table import STORAGE_OPTIONS_ENV

    env = None
    if storage_options:  # the app's stores read them from the environment
        env = {**os.environ, STORAGE_OPTIONS_ENV: json.dumps(storage_options)}
    from chipscout import app as app_package

    script = Path(app_package.__file__).resolve().with_name("main.py")
    command = [sys.executable, "-m", "streamlit", "run", str(script),
               "--server.address", address, "--server.port", str(port), "--server.headless", "true",
               "--browser.gatherUsageStats", "false", "--", "--db", db_uri, "--table", table]
    typer.echo(f"chipscout app on http://{address}:{port}  (Ctrl+C to stop)")
    try:
        subprocess.run(command, check=False, env=env)
    except KeyboardInterrupt:
        pass


@app.command("app")
def run_app(
    db: DbOption = None,
    table: TableOption = "chips",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8501,
    address: Annotated[str, typer.Option(help="Address to bind (default: this machine only).")] = "127.0.0.1",
    storage_option: StorageOption = None,
) -> None:
    """Serve the Streamlit app over a chip table."""
    launch_app(_db(db), table, port, address, _storage_options(storage_option))


@app.command()
def demo(
    no_app: Annotated[bool, typer.Option("--no-app", help="Only prepare and index the demo scene.")] = False,
    db: DbOption = None,
    table: TableOption = "demo",
    port: Annotated[int, typer.Option(help="Port for the app.")] = 8501,
    as_json: JsonOption = False,
) -> None:
    """Index the bundled real Sentinel-2 scene (Virginia Eastern Shore) and serve the app."""
    from chipscout.indexer.sources.demo import run_demo

    summary = run_demo(_db(db), table, progress=not as_json)
    _report_summary(summary, as_json)
    if not no_app:
        launch_app(_db(db), table, port, "127.0.0.1")


from chipscout.indexer.cli.stac import index_stac_command  # noqa: E402  (needs the option aliases above)
index_app.command("stac")(index_stac_command())

from chipscout.indexer.cli.label import export_command, label_app  # noqa: E402
app.add_typer(label_app, name="label")
app.command("export")(export_command)


def main() -> None:
    try:
        app()
    except (ChipscoutError, EncoderError) as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
