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

from encoders.base import EncoderError
from indexer.errors import ChipscoutError

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


def _db(db: str | None) -> str:
    from indexer.paths import default_db_uri

    return db or default_db_uri()


def _print_json(payload: Any) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str))


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


# ----------------------------------------------------------------------------- encoder options
EncoderOpt = Annotated[str, typer.Option("--encoder", help="rcf, band-stats, clay-v1-base, clay-v1.5-large, clay-tiny.")]
KernelsOpt = Annotated[Optional[str], typer.Option("--kernels", help="RCF kernels: gaussian or empirical.")]
FeaturesOpt = Annotated[Optional[int], typer.Option("--features", help="RCF features (even; default 1024).")]
KernelSizeOpt = Annotated[Optional[int], typer.Option("--kernel-size", help="RCF kernel size in pixels (default 3).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed of the encoder.")]
CheckpointOpt = Annotated[Optional[Path], typer.Option("--checkpoint", help="Clay checkpoint (.ckpt or state dict).")]
PoolingOpt = Annotated[Optional[str], typer.Option("--pooling", help="MAE pooling: cls, mean or patch.")]
NoLatLonOpt = Annotated[bool, typer.Option("--no-latlon", help="MAE: ignore location (location-agnostic search).")]
NoTimeOpt = Annotated[bool, typer.Option("--no-time", help="MAE: ignore acquisition time.")]


def encoder_choice(name: str, kernels: str | None, features: int | None, kernel_size: int | None,
                   seed: int | None, checkpoint: Path | None, pooling: str | None,
                   no_latlon: bool, no_time: bool):
    from encoders.base import encoder_parameters
    from indexer.pipeline import EncoderChoice

    given: dict[str, Any] = {
        "kernels": kernels, "features": features, "kernel_size": kernel_size, "seed": seed,
        "checkpoint": str(checkpoint) if checkpoint else None, "pooling": pooling,
        "use_latlon": False if no_latlon else None, "use_time": False if no_time else None,
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
    max_nodata: Annotated[float, typer.Option("--max-nodata", help="Skip chips with more nodata than this fraction.")] = 0.5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Chips per encoder batch.")] = 32,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: a GPU when there is one).")] = None,
    db: DbOption = None,
    table: TableOption = "chips",
    as_json: JsonOption = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Index local GeoTIFF/COG files."""
    from indexer.chips import ChipGrid
    from indexer.files import local_source, parse_datetime
    from indexer.pipeline import index_sources

    if source_id and len(paths) > 1:
        raise ChipscoutError("--source-id names one source; give one path with it")
    acquired = parse_datetime(date, "--date") if date else None
    sources = [local_source(p, sensor=sensor, file_bands=_split(file_bands), acquired=acquired,
                            source_id=source_id) for p in paths]
    choice = encoder_choice(encoder, kernels, features, kernel_size, seed, checkpoint, pooling,
                            no_latlon, no_time)
    summary = index_sources(
        sources, db_uri=_db(db), table_name=table, encoder=choice,
        grid=ChipGrid(size, stride or size), bands=_split(bands), max_nodata_fraction=max_nodata,
        batch_size=batch_size, device=device, progress=progress and not as_json)
    _report_summary(summary, as_json)


def _report_summary(summary, as_json: bool) -> None:
    if as_json:
        _print_json(summary.to_dict())
    else:
        typer.echo(
            f"{summary.table}: {summary.chips_new} new chips, {summary.chips_present} already present, "
            f"{summary.chips_skipped_nodata} skipped for nodata, {summary.chips_skipped_cloud} for cloud; "
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
    db: DbOption = None,
    table: TableOption = "chips",
    as_json: JsonOption = False,
) -> None:
    """Find the chips most similar to CHIP_ID."""
    from indexer.search import SearchEngine, SearchFilters

    filters = SearchFilters.build(date_from, date_to, bbox, max_cloud, max_nodata, exclude_overlapping)
    engine = SearchEngine(_db(db), table)
    response = engine.similar_to_chip(chip_id, k, filters)
    if as_json:
        _print_json(response.to_dict())
        return
    typer.echo(f"neighbours of {chip_id} ({len(response.results)} in {response.elapsed_ms:.1f} ms, "
               f"{'ANN index' if response.used_index else 'exact search'})")
    typer.echo(f"{'rank':>4}  {'similarity':>10}  {'lon':>9}  {'lat':>8}  {'date':10}  chip_id")
    for r in response.results:
        when = r.chip.acquired.date().isoformat() if r.chip.acquired else "unknown"
        typer.echo(f"{r.rank:>4}  {r.similarity:>10.4f}  {r.chip.center_lon:>9.4f}  "
                   f"{r.chip.center_lat:>8.4f}  {when:10}  {r.chip.chip_id}")


@app.command()
def info(
    db: DbOption = None,
    table: Annotated[Optional[str], typer.Option("--table", help="Chip table (default: list the tables).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Describe a table: rows, encoder, bands, normalisation, versions, indexes."""
    from dataclasses import asdict

    from indexer.store import ChipStore

    uri = _db(db)
    if table is None:
        names = ChipStore(uri, "chips").table_names()
        if as_json:
            _print_json({"db": uri, "tables": names})
        else:
            typer.echo(f"{uri}: {', '.join(names) if names else 'no tables'}")
        return
    store = ChipStore(uri, table)
    config = store.config
    payload = {
        "db": uri, "table": table, "rows": store.count(), "version": store.table.version,
        "config": asdict(config), "indexes": store.index_description(),
    }
    if as_json:
        _print_json(payload)
        return
    typer.echo(f"table {table} in {uri}: {payload['rows']} chips, version {payload['version']}")
    typer.echo(f"  encoder   {config.encoder_label} ({config.encoder}) {json.dumps(config.encoder_config)}")
    typer.echo(f"  vectors   {config.embedding_dim}-d, {config.metric}, state sha256 {config.state_sha256[:12]}")
    typer.echo(f"  sensor    {config.sensor}: {', '.join(config.bands)}")
    typer.echo(f"  scaling   {config.normalization.kind}")
    typer.echo(f"  chips     {config.chip_size_px} px, stride {config.chip_stride_px} px")
    typer.echo(f"  written   by chipscout {config.chipscout_version}, created {config.created_at}")
    typer.echo(f"  indexes   {payload['indexes'] or 'none (exact search)'}")


# ----------------------------------------------------------------------------- eval
@app.command("eval")
def evaluate(
    path: Annotated[Path, typer.Argument(help="Folder laid out PATH/<class>/<image>.")],
    encoder: EncoderOpt = "rcf",
    kernels: KernelsOpt = None,
    features: FeaturesOpt = None,
    kernel_size: KernelSizeOpt = None,
    seed: SeedOpt = None,
    sensor: Annotated[Optional[str], typer.Option(help="Band table (default: from the files).")] = None,
    bands: Annotated[Optional[str], typer.Option(help="Bands to use, comma-separated.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    device: Annotated[Optional[str], typer.Option()] = None,
    as_json: JsonOption = False,
) -> None:
    """Leave-one-out retrieval quality (precision@k, mAP) on a labelled folder."""
    from indexer.evaluate import evaluate_folder, format_report

    choice = encoder_choice(encoder, kernels, features, kernel_size, seed, None, None, False, False)
    report = evaluate_folder(path, encoder=choice.name, encoder_params=choice.params, sensor=sensor,
                             bands=_split(bands), batch_size=batch_size, device=device,
                             progress=not as_json)
    if as_json:
        _print_json(report.to_dict())
    else:
        typer.echo(format_report(report))


# ----------------------------------------------------------------------------- app / demo
def launch_app(db_uri: str, table: str, port: int, address: str) -> None:
    script = Path(__file__).resolve().parent.parent / "app" / "main.py"
    command = [sys.executable, "-m", "streamlit", "run", str(script),
               "--server.address", address, "--server.port", str(port), "--server.headless", "true",
               "--browser.gatherUsageStats", "false", "--", "--db", db_uri, "--table", table]
    typer.echo(f"chipscout app on http://{address}:{port}  (Ctrl+C to stop)")
    try:
        subprocess.run(command, check=False)
    except KeyboardInterrupt:
        pass


@app.command("app")
def run_app(
    db: DbOption = None,
    table: TableOption = "chips",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8501,
    address: Annotated[str, typer.Option(help="Address to bind (default: this machine only).")] = "127.0.0.1",
) -> None:
    """Serve the Streamlit app over a chip table."""
    launch_app(_db(db), table, port, address)


@app.command()
def demo(
    no_app: Annotated[bool, typer.Option("--no-app", help="Only prepare and index the demo scene.")] = False,
    db: DbOption = None,
    table: TableOption = "demo",
    port: Annotated[int, typer.Option(help="Port for the app.")] = 8501,
    as_json: JsonOption = False,
) -> None:
    """Index the bundled real Sentinel-2 scene (Virginia Eastern Shore) and serve the app."""
    from indexer.demo import run_demo

    summary = run_demo(_db(db), table, progress=not as_json)
    _report_summary(summary, as_json)
    if not no_app:
        launch_app(_db(db), table, port, "127.0.0.1")


def main() -> None:
    try:
        app()
    except (ChipscoutError, EncoderError) as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
