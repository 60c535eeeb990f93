"""Every option the commands share, declared once, and the helpers that read them.

No `from __future__ import annotations`: typer reads the aliases below at runtime. Nothing heavy
is imported here (no torch, rasterio or lancedb), so `chipscout --help` stays light.
"""

import contextlib
import functools
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from chipscout.indexer.errors import ChipscoutError

# ----------------------------------------------------------------------------- tables
DbOption = Annotated[Optional[str], typer.Option("--db", help="LanceDB database (folder or s3:// URI). Default: $CHIPSCOUT_DB or ~/.local/share/chipscout/db.")]
#: The table a command reads. Omitted: the database's one chip table (`default_table`).
TableOption = Annotated[Optional[str], typer.Option("--table", help="Chip table name (default: the database's only chip table).")]
#: The table an index run writes (created when missing).
IndexTableOption = Annotated[str, typer.Option("--table", help="Chip table name (created when missing).")]
MemoryOption = Annotated[Optional[str], typer.Option("--memory", help="Memory budget of the warm path (bytes, or e.g. 500MB, 2GiB; default 2GiB): vectors are held as float32, float16, int8 or only as a sketch to fit it (docs/sizing.md).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
StorageOption = Annotated[Optional[list[str]], typer.Option("--storage-option", help="Object-store option KEY=VALUE for --db s3://... (repeatable), e.g. aws_endpoint=http://127.0.0.1:9000, allow_http=true; credentials also come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION.")]

# ----------------------------------------------------------------------------- encoders
EncoderOpt = Annotated[str, typer.Option("--encoder", help="rcf, band-stats, clay-v1-base, clay-v1.5-large, clay-tiny; or a published per-pixel embedding product: aef, tessera, raster-embedding (docs/products.md).")]
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
YearOpt = Annotated[Optional[int], typer.Option("--year", help="Products (aef, tessera, raster-embedding): the product's year, recorded in the table (and the chips' date when the files give none).")]
ChannelsOpt = Annotated[Optional[int], typer.Option("--channels", help="raster-embedding: bands per pixel in the file (with --dequantize per-pixel-scale, the last one is the scale).")]
DequantizeOpt = Annotated[Optional[str], typer.Option("--dequantize", help="raster-embedding: linear (v * --scale + --offset; default), aef (sign(v)*(|v|/127.5)^2) or per-pixel-scale (last band scales the others).")]
ScaleOpt = Annotated[Optional[float], typer.Option("--scale", help="raster-embedding: linear de-quantisation scale (default 1).")]
OffsetOpt = Annotated[Optional[float], typer.Option("--offset", help="raster-embedding: linear de-quantisation offset (default 0).")]
NodataOpt = Annotated[Optional[float], typer.Option("--nodata", help="raster-embedding: stored value of a pixel without an embedding (default: the file's nodata).")]

#: The encoder flags of the index commands, in their order: (parameter, option, default).
ENCODER_FLAGS = (
    ("encoder", EncoderOpt, "rcf"), ("kernels", KernelsOpt, None), ("features", FeaturesOpt, None),
    ("kernel_size", KernelSizeOpt, None), ("seed", SeedOpt, None), ("checkpoint", CheckpointOpt, None),
    ("pooling", PoolingOpt, None), ("no_latlon", NoLatLonOpt, False), ("no_time", NoTimeOpt, False),
    ("bias", BiasOpt, None), ("band_stats", BandStatsOpt, False), ("year", YearOpt, None),
    ("channels", ChannelsOpt, None), ("dequantize", DequantizeOpt, None), ("scale", ScaleOpt, None),
    ("offset", OffsetOpt, None), ("nodata", NodataOpt, None),
)
#: Encoders that read a published per-pixel embedding product, and the band table each reads with.
PRODUCT_ENCODERS = ("aef", "tessera", "raster-embedding")


def with_encoder_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give `command` the encoder flags (`ENCODER_FLAGS`) where its `encoder_flags` parameter
    stands; it is called with them gathered in that one dict (`encoder_choice_of` reads it)."""
    signature = inspect.signature(command)
    parameters = []
    for parameter in signature.parameters.values():
        if parameter.name != "encoder_flags":
            parameters.append(parameter)
            continue
        parameters += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                         annotation=option) for name, option, default in ENCODER_FLAGS]

    @functools.wraps(command)
    def with_flags(**given: Any) -> Any:
        flags = {name: given.pop(name) for name, _, _ in ENCODER_FLAGS}
        return command(**given, encoder_flags=flags)

    with_flags.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return with_flags


# ----------------------------------------------------------------------------- indexing
BandsOpt = Annotated[Optional[str], typer.Option(help="Bands to index, comma-separated (default: the sensor's surface bands).")]
SizeOpt = Annotated[int, typer.Option("--size", help="Chip size in pixels.")]
StrideOpt = Annotated[Optional[int], typer.Option("--stride", help="Grid stride in pixels (default: the chip size).")]
MaxNodataOpt = Annotated[float, typer.Option("--max-nodata", help="Skip chips with more nodata than this fraction.")]
MaxChipsOpt = Annotated[int, typer.Option("--max-chips-per-source", help="Refuse a source whose grid makes more chips than this (checked on its header, before reading).")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds each network request (STAC API, remote raster reads) may take, retries included; a silent server fails within it.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Chips per encoder batch.")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: a GPU when there is one).")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]
ClusterOption = Annotated[Optional[str], typer.Option("--cluster", help="Index on a Dask cluster of worker processes on this machine: local (one per core) or local:N.")]
SchedulerOption = Annotated[Optional[str], typer.Option("--scheduler", help="Index on a running Dask cluster: its scheduler, tcp://HOST:PORT.")]
SearchClusterOption = Annotated[Optional[str], typer.Option("--cluster", help="Search on a Dask cluster of worker processes on this machine (local or local:N), the table's fragments split among them.")]
SearchSchedulerOption = Annotated[Optional[str], typer.Option("--scheduler", help="Search on a running Dask cluster (its scheduler, tcp://HOST:PORT), the table's fragments split among its workers.")]


def db_uri(db: str | None) -> str:
    from chipscout.indexer.paths import default_db_uri

    uri = db or default_db_uri()
    if "://" not in uri and Path(uri).expanduser().is_file():
        raise ChipscoutError(f"--db {uri}: is a file; a LanceDB database is a folder (or an s3:// URI)")
    return uri


def resolve_table(db: str | None, table: str | None, storage_option: list[str] | None = None) -> str:
    """`table`, or when it is None the database's only chip table; with none or several, the
    one-line error names the tables there are."""
    if table is not None:
        return table
    from chipscout.indexer.store import ChipStore

    uri = db_uri(db)
    names = ChipStore(uri, "chips", storage_options(storage_option)).table_names()
    if len(names) == 1:
        return names[0]
    if not names:
        raise ChipscoutError(f"no chip tables in {uri}; run `chipscout demo` or `chipscout index` first "
                             "(or give --db)")
    raise ChipscoutError(f"{uri} holds {len(names)} chip tables ({', '.join(names)}); choose one with --table")


def default_table(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run `command` with its `table` resolved by `resolve_table` (from its `db` and, when it has
    one, `storage_option`): every command that reads a table treats an omitted --table alike."""

    @functools.wraps(command)
    def with_table(**given: Any) -> Any:
        given["table"] = resolve_table(given.get("db"), given.get("table"), given.get("storage_option"))
        return command(**given)

    return with_table


def print_json(payload: Any) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str))


def split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def storage_options(pairs: list[str] | None) -> dict[str, str] | None:
    """`--storage-option KEY=VALUE` options as a dict (None when none were given)."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ChipscoutError(f"bad --storage-option {pair!r}: expected KEY=VALUE, e.g. allow_http=true")
        options[key.strip()] = value.strip()
    return options or None


def encoder_choice(name: str, kernels: str | None, features: int | None, kernel_size: int | None,
                   seed: int | None, checkpoint: Path | None, pooling: str | None,
                   no_latlon: bool, no_time: bool, *, bias: float | None = None,
                   band_stats: bool = False, product: dict[str, Any] | None = None):
    """The encoder and the options the user gave; an option this encoder does not take is refused."""
    from chipscout.encoders.base import encoder_parameters
    from chipscout.indexer.ingest.job import EncoderChoice

    given: dict[str, Any] = {
        "kernels": kernels, "features": features, "kernel_size": kernel_size, "seed": seed,
        "checkpoint": str(checkpoint) if checkpoint else None, "pooling": pooling,
        "use_latlon": False if no_latlon else None, "use_time": False if no_time else None,
        "bias": bias, "band_stats": True if band_stats else None,
    }
    product = product or {}
    given.update({"year": product.get("year"), "in_channels": product.get("channels"),
                  "dequantize": product.get("dequantize"), "scale": product.get("scale"),
                  "offset": product.get("offset"), "nodata": product.get("nodata")})
    if name in ("aef", "tessera"):
        given["in_channels"] = None  # fixed by the product; a wrong file is refused on its header
    accepted = encoder_parameters(name)
    params = {}
    for key, value in given.items():
        if value is None:
            continue
        if key not in accepted:
            flag = "--" + {"in_channels": "channels"}.get(key, key).replace("_", "-").replace("use-", "no-")
            raise ChipscoutError(f"encoder {name} does not take {flag}")
        params[key] = value
    return EncoderChoice(name, params)


def index_job(flags: dict[str, Any], command: str, **options: Any):
    """The `IndexJob` of an index command from its parsed `flags` (the command's `locals()`:
    the shared options above under their parameter names, the encoder's gathered by
    `with_encoder_flags`), plus the command's own `options`."""
    from chipscout.indexer.chips import ChipGrid
    from chipscout.indexer.ingest.job import ClusterOptions, IndexJob

    encoder = flags["encoder_flags"]
    choice = encoder_choice(encoder["encoder"], encoder["kernels"], encoder["features"], encoder["kernel_size"],
                            encoder["seed"], encoder["checkpoint"], encoder["pooling"], encoder["no_latlon"],
                            encoder["no_time"], bias=encoder["bias"], band_stats=encoder["band_stats"],
                            product=encoder)
    return IndexJob(
        db_uri=db_uri(flags["db"]), table_name=flags["table"], encoder=choice,
        grid=ChipGrid(flags["size"], flags["size"] if flags["stride"] is None else flags["stride"]), bands=split(flags["bands"]),
        max_nodata_fraction=flags["max_nodata"], max_chips_per_source=flags["max_chips_per_source"],
        batch_size=flags["batch_size"], device=flags["device"],
        progress=flags["progress"] and not flags["as_json"],
        storage_options=storage_options(flags["storage_option"]),
        cluster=ClusterOptions(cluster=flags["cluster"], scheduler=flags["scheduler"]),
        run_request={"command": command, "argv": sys.argv[1:]}, **options)


@contextlib.contextmanager
def failures_reported(as_json: bool):
    """Around an index run: when no source gives a chip (`NothingToFitError`), every source's
    reason goes to stderr as a red line (and to stdout as JSON with --json); exit 2."""
    from chipscout.indexer.errors import NothingToFitError

    try:
        yield
    except NothingToFitError as err:
        if as_json:
            print_json({"error": str(err), "chips_new": 0, "failures": err.failures})
        for failure in err.failures:
            reason = failure["reason"]
            where = "" if reason.startswith(failure["source"]) else failure["source"] + ": "
            typer.secho(f"failed: {where}{reason}", fg="red", err=True)
        typer.secho("error: no valid chips to fit the encoder on; every source failed (above)",
                    fg="red", err=True)
        raise typer.Exit(2) from None


def report_summary(summary, as_json: bool) -> None:
    """An indexing summary as one line (or JSON), each failure as a red line; exit 2 on failures."""
    if as_json:
        print_json(summary.to_dict())
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


def product_sensor(encoder_flags: dict[str, Any], sensor: str | None, default_sensor: str | None):
    """The band table a product encoder reads with (None for imagery encoders): `aef`,
    `tessera`, or `embedding-N` for `raster-embedding --channels N`. A `--sensor` naming imagery
    beside a product encoder is refused."""
    name = encoder_flags["encoder"]
    if name not in PRODUCT_ENCODERS:
        return None
    if sensor not in (None, default_sensor, name):
        raise ChipscoutError(f"--encoder {name} reads its own band table; drop --sensor {sensor}")
    from chipscout.indexer.sensors import embedding_sensor, get_sensor

    if name != "raster-embedding":
        return get_sensor(name)
    channels = encoder_flags.get("channels")
    if channels is None:
        raise ChipscoutError("--encoder raster-embedding needs --channels (the bands per pixel in the file)")
    if channels < 1:
        raise ChipscoutError(f"--channels must be at least 1, got {channels}")
    return embedding_sensor(channels, encoder_flags.get("nodata"))
