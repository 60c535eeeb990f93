"""`chipscout change CHIP_ID --before DATE_A --after DATE_B`: places whose change looks like the
change at CHIP_ID's place (docs/where-and-change.md). Heavy imports stay inside the function."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from chipscout.indexer.cli.options import DbOption, JsonOption, StorageOption, TableOption


def change_command(
    location: Annotated[str, typer.Argument(help="A chip id naming the place (a chip of any date there).")],
    before: Annotated[str, typer.Option("--before", help="The example's before period: a date (2024-06-15), a month (2024-06) or START/END.")],
    after: Annotated[str, typer.Option("--after", help="The example's after period, as --before.")],
    k: Annotated[int, typer.Option("-k", "--k", help="Number of places.")] = 10,
    other_before: Annotated[Optional[str], typer.Option("--other-before", help="Before period of the other places (default: --before).")] = None,
    other_after: Annotated[Optional[str], typer.Option("--other-after", help="After period of the other places (default: --after).")] = None,
    method: Annotated[str, typer.Option("--method", help="Change vector: residual (what is new: after minus its projection on before, normalised; the default, measured best), difference (after - before, normalised), or after (the after chip alone, for comparison).")] = "residual",
    min_overlap: Annotated[float, typer.Option("--min-overlap", help="Chips of different grids are the same place from this footprint intersection over union.")] = 0.5,
    bbox: Annotated[Optional[str], typer.Option(help="MINLON,MINLAT,MAXLON,MAXLAT.")] = None,
    max_cloud: Annotated[Optional[float], typer.Option("--max-cloud", help="Maximum cloud fraction 0..1 (both dates).")] = None,
    max_nodata: Annotated[Optional[float], typer.Option("--max-nodata", help="Maximum nodata fraction 0..1 (both dates).")] = None,
    spread_km: Annotated[float, typer.Option("--spread-km", help="At most --per-cell places per grid cell of this size in km; 0: off.")] = 0.0,
    per_cell: Annotated[int, typer.Option("--per-cell", help="Places per grid cell when spreading.")] = 1,
    geojson: Annotated[Optional[Path], typer.Option("--geojson", help="Also write the places as GeoJSON (after footprints) to this file.")] = None,
    thumbnails: Annotated[Optional[Path], typer.Option("--thumbnails", help="Write each pair's before | after thumbnails side by side as PNGs into this folder.")] = None,
    db: DbOption = None,
    table: TableOption = "chips",
    as_json: JsonOption = False,
    storage_option: StorageOption = None,
) -> None:
    """Find places whose change between two periods looks like the change at LOCATION."""
    from chipscout.indexer.cli.options import db_uri, print_json, storage_options
    from chipscout.indexer.search import ChangeSearch, SearchEngine, SearchFilters, Spread, pair_png

    filters = SearchFilters.build(None, None, bbox, max_cloud, max_nodata)
    spread = Spread(spread_km, per_cell) if spread_km else None
    engine = SearchEngine(db_uri(db), table, storage_options=storage_options(storage_option))
    response = ChangeSearch(engine).search(location, before, after, k, filters, other_before=other_before,
                                           other_after=other_after, method=method, min_overlap=min_overlap,
                                           spread=spread)
    if geojson is not None:
        geojson.write_text(json.dumps(response.to_geojson()))
    written = []
    if thumbnails is not None:
        thumbnails.mkdir(parents=True, exist_ok=True)
        pairs = [response.query] + [r.pair for r in response.results]
        stored = engine.thumbnails([c.chip_id for p in pairs for c in (p.before, p.after)])
        for rank, pair in enumerate(pairs):
            path = thumbnails / f"{rank:03d}_{pair.after.chip_id}.png"
            path.write_bytes(pair_png(stored.get(pair.before.chip_id), stored.get(pair.after.chip_id)))
            written.append(path)
    if as_json:
        print_json({**response.to_dict(), "files": [str(p) for p in written]})
        return
    query = response.query
    typer.echo(f"change at {query.after.chip_id}'s place, {query.before.acquired:%Y-%m-%d} -> "
               f"{query.after.acquired:%Y-%m-%d} ({response.method}; {response.pairs_compared} other places "
               f"compared in {response.elapsed_ms:.1f} ms)")
    typer.echo(f"{'rank':>4}  {'similarity':>10}  {'before':10}  {'after':10}  {'match':9}  before_chip_id -> after_chip_id")
    for r in response.results:
        typer.echo(f"{r.rank:>4}  {r.similarity:>10.4f}  {r.pair.before.acquired:%Y-%m-%d}  "
                   f"{r.pair.after.acquired:%Y-%m-%d}  {r.pair.match:9}  {r.pair.before.chip_id} -> {r.pair.after.chip_id}")
    if written:
        typer.echo(f"wrote {len(written)} before | after image(s) to {thumbnails}")
