"""`chipscout search ... --where OUT_DIR`: heatmaps of where in each result the match lies, and
ranking by the best cell (`--rank-by-cell`, `--cell ROW,COL`). Heavy imports stay inside the
functions so `chipscout --help` loads no torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from chipscout.indexer.errors import QueryError

WhereOpt = Annotated[Optional[Path], typer.Option("--where", help="Write a heatmap per result into this folder: where in the chip it matches the query (GeoTIFF of cell similarities and/or a PNG over the thumbnail; a .txt note when its source cannot be read again).")]
WhereFormatOpt = Annotated[str, typer.Option("--where-format", help="Heatmap files: both, geotiff or png.")]
HeatmapSourceOpt = Annotated[str, typer.Option("--heatmap-source", help="auto (stored patch vectors when the table keeps them, else re-read pixels), pixels or patches.")]
RankByCellOpt = Annotated[bool, typer.Option("--rank-by-cell", help="Rank by each chip's best-matching cell instead of the whole chip (find a small thing anywhere inside a chip); re-ranks the whole-chip search's top --pool.")]
PoolOpt = Annotated[Optional[int], typer.Option("--pool", help="With --rank-by-cell: whole-chip results re-ranked (default 100).")]
CellOpt = Annotated[Optional[str], typer.Option("--cell", help="ROW,COL of the query chip's cell grid: search for that small part of it.")]

FORMATS = ("both", "geotiff", "png")


def parse_cell(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.split(",")
    try:
        row, col = (int(p) for p in parts)
    except ValueError:
        raise QueryError(f"--cell must be ROW,COL (two whole numbers), got {text!r}") from None
    return row, col


def wanted(where: Path | None, rank_by_cell: bool, cell: str | None) -> bool:
    return where is not None or rank_by_cell or cell is not None


def search_where_command(engine: Any, chip_id: str, k: int, filters: Any, expand: int | None, spread: Any, *,
                         where: Path | None, where_format: str, heatmap_source: str, rank_by_cell: bool,
                         pool: int | None, cell: str | None, as_json: bool) -> None:
    """The search command's run when heatmaps or cell ranking are asked for."""
    from chipscout.indexer.cli.options import print_json
    from chipscout.indexer.search import search_where, write_heatmaps

    if where_format not in FORMATS:
        raise QueryError(f"--where-format must be one of {', '.join(FORMATS)}, got {where_format!r}")
    answer = search_where(engine, chip_id, k, filters, expand=expand, spread=spread, cell=parse_cell(cell),
                          rank_by_cell=rank_by_cell, pool=pool, use=heatmap_source)
    written = []
    if where is not None:
        thumbnails = engine.thumbnails([r.chip.chip_id for r in answer.response.results]) \
            if where_format in ("both", "png") else None
        written = write_heatmaps(answer.heatmaps, where, geotiff=where_format in ("both", "geotiff"),
                                 png=where_format in ("both", "png"), thumbnails=thumbnails)
    if as_json:
        payload = answer.response.to_dict()
        payload["ranked_by"] = answer.ranked_by
        for result, heatmap in zip(payload["results"], answer.heatmaps):
            result["heatmap"] = heatmap.to_dict()
        payload["files"] = [str(p) for p in written]
        print_json(payload)
        return
    response = answer.response
    what = f"cell {cell} of {chip_id}" if cell else chip_id
    typer.echo(f"neighbours of {what} ({len(response.results)}, ranked by "
               f"{'best cell' if answer.ranked_by == 'cell' else 'whole chip'})")
    typer.echo(f"{'rank':>4}  {'similarity':>10}  {'best cell':>9}  {'at':>7}  {'date':10}  chip_id")
    for result, heatmap in zip(response.results, answer.heatmaps):
        when = result.chip.acquired.date().isoformat() if result.chip.acquired else "unknown"
        at = "" if heatmap.best_cell is None else f"{heatmap.best_cell[0]},{heatmap.best_cell[1]}"
        best = f"{heatmap.best_similarity:>9.4f}" if heatmap.ok else f"{'-':>9}"
        typer.echo(f"{result.rank:>4}  {result.similarity:>10.4f}  {best}  {at:>7}  {when:10}  {result.chip.chip_id}")
        if not heatmap.ok:
            typer.secho(f"      note: {heatmap.note}", fg="yellow")
    if where is not None:
        typer.echo(f"wrote {len(written)} file(s) to {where}")
