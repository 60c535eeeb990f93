"""`chipscout label ...` and `chipscout export`: labelling sessions from the command line, for scripts.

Registered by `chipscout.indexer.cli.commands` (`app.add_typer(label_app, name="label")`,
`app.command("export")`). Every subcommand takes the options the other commands share
(`--db`, `--table`, `--storage-option`, `--json`; `chipscout.indexer.cli.options`).
Errors are LabelError (a ChipscoutError), which `chipscout` prints as one red line.
"""

# No `from __future__ import annotations`: typer reads these annotations at runtime.
import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from chipscout.indexer.cli.options import (DbOption, JsonOption, StorageOption, TableOption, db_uri, default_table,
                                           storage_options)

label_app = typer.Typer(help="Label chips into seed sets: sessions, labels, proposals, quality.",
                        no_args_is_help=True)

SessionArg = Annotated[str, typer.Argument(help="Session name.")]
ByOption = Annotated[Optional[str], typer.Option("--by", help="Who labels (default: $USER).")]
StrategyOption = Annotated[Optional[str], typer.Option("--strategy", help="auto, single, mean, rocchio or classifier (default: the session's).")]
BetaOption = Annotated[Optional[float], typer.Option("--beta", help="Rocchio weight of the negatives (default 0.5).")]


def _labels(db: Optional[str], table: str, storage_option: Optional[list[str]]):
    """The search engine over the table, and its labelling sessions."""
    from chipscout.indexer.search.engine import SearchEngine
    from chipscout.indexer.seedsets.labels import LabelStore

    engine = SearchEngine(db_uri(db), table, storage_options=storage_options(storage_option))
    return engine, LabelStore.for_engine(engine)


def _print_json(payload: Any) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str))


def _options(beta: Optional[float]) -> dict[str, Any]:
    return {} if beta is None else {"beta": beta}


@label_app.command("sessions")
@default_table
def sessions(db: DbOption = None, table: TableOption = None,
             storage_option: StorageOption = None, as_json: JsonOption = False) -> None:
    """List the labelling sessions of a table."""
    _, store = _labels(db, table, storage_option)
    rows = [{**s.to_dict(), **store.counts(s)} for s in store.sessions()]
    if as_json:
        _print_json({"table": table, "sessions": rows})
        return
    if not rows:
        typer.echo(f"no labelling sessions for table {table}")
        return
    typer.echo(f"{'name':24}  {'pos':>5}  {'neg':>5}  {'round':>5}  {'strategy':10}  {'created':19}  by")
    for row in rows:
        typer.echo(f"{row['name']:24}  {row['positive']:>5}  {row['negative']:>5}  {row['current_round']:>5}  "
                   f"{row['strategy']:10}  {row['created'][:19]:19}  {row['created_by']}")


@label_app.command("new")
@default_table
def new(name: SessionArg, strategy: Annotated[str, typer.Option(help="Default ranking strategy.")] = "auto",
        notes: Annotated[str, typer.Option(help="Free text kept with the session.")] = "",
        by: ByOption = None, db: DbOption = None, table: TableOption = None,
        storage_option: StorageOption = None,
        as_json: JsonOption = False) -> None:
    """Create a labelling session."""
    _, store = _labels(db, table, storage_option)
    session = store.create_session(name, strategy=strategy, notes=notes, created_by=by)
    if as_json:
        _print_json(session.to_dict())
    else:
        typer.echo(f"created session {session.name!r} on table {table} (strategy {session.strategy})")


@label_app.command("rename")
@default_table
def rename(name: SessionArg, new_name: Annotated[str, typer.Argument(help="New name.")],
           db: DbOption = None, table: TableOption = None,
           storage_option: StorageOption = None, as_json: JsonOption = False) -> None:
    """Rename a session (its labels stay with it)."""
    _, store = _labels(db, table, storage_option)
    session = store.rename_session(name, new_name)
    if as_json:
        _print_json(session.to_dict())
    else:
        typer.echo(f"renamed session {name!r} to {session.name!r}")


@label_app.command("delete")
@default_table
def delete(name: SessionArg, yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
           db: DbOption = None, table: TableOption = None,
           storage_option: StorageOption = None, as_json: JsonOption = False) -> None:
    """Delete a session and all its labels."""
    _, store = _labels(db, table, storage_option)
    session = store.session(name)
    if not yes:
        counts = store.counts(session)
        typer.confirm(f"delete session {name!r} with {counts['positive']} positive and "
                      f"{counts['negative']} negative labels?", abort=True)
    removed = store.delete_session(session)
    if as_json:
        _print_json({"deleted": session.name, "labels": removed})
    else:
        typer.echo(f"deleted session {session.name!r} and its {removed} labels")


@label_app.command("add")
@default_table
def add(name: SessionArg, chip_ids: Annotated[list[str], typer.Argument(help="Chip ids to label.")],
        negative: Annotated[bool, typer.Option("--negative", help="Label them negative (default: positive).")] = False,
        by: ByOption = None, db: DbOption = None, table: TableOption = None,
        storage_option: StorageOption = None,
        as_json: JsonOption = False) -> None:
    """Label chips positive (or --negative); a chip labelled before gets the new label."""
    _, store = _labels(db, table, storage_option)
    written = store.set_labels(name, {c: not negative for c in chip_ids}, by=by, origin="cli")
    if as_json:
        _print_json({"session": name, "labels": [label.to_dict() for label in written]})
    else:
        kind = "negative" if negative else "positive"
        typer.echo(f"labelled {len(written)} chip(s) {kind} in session {name!r}")


@label_app.command("remove")
@default_table
def remove(name: SessionArg, chip_ids: Annotated[list[str], typer.Argument(help="Chip ids to unlabel.")],
           db: DbOption = None, table: TableOption = None,
           storage_option: StorageOption = None, as_json: JsonOption = False) -> None:
    """Remove chips' labels from a session."""
    _, store = _labels(db, table, storage_option)
    removed = store.remove_labels(name, chip_ids)
    if as_json:
        _print_json({"session": name, "removed": removed})
    else:
        typer.echo(f"removed {removed} label(s) from session {name!r}")


@label_app.command("labels")
@default_table
def show_labels(name: SessionArg, db: DbOption = None, table: TableOption = None,
                storage_option: StorageOption = None,
                as_json: JsonOption = False) -> None:
    """List a session's labels."""
    _, store = _labels(db, table, storage_option)
    labels = store.labels(name)
    if as_json:
        _print_json({"session": name, "labels": [label.to_dict() for label in labels]})
        return
    for label in labels:
        score = "" if label.score is None else f"{label.score:.4f}"
        typer.echo(f"{label.label:8}  round {label.round:<3}  {score:>8}  {label.labelled_by:12}  "
                   f"{label.labelled_at.isoformat(timespec='seconds')}  {label.chip_id}")


@label_app.command("propose")
@default_table
def propose(name: SessionArg,
            n: Annotated[int, typer.Option("-n", help="How many chips to propose.")] = 20,
            uncertain: Annotated[int, typer.Option("--uncertain", help="Of those, how many the classifier is least sure of.")] = 0,
            strategy: StrategyOption = None, beta: BetaOption = None,
            spread_km: Annotated[Optional[float], typer.Option("--spread-km", help="Grid cell size in km for spreading proposals.")] = None,
            per_cell: Annotated[int, typer.Option("--per-cell", help="At most this many proposals per cell.")] = 1,
            dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show; do not start a new round.")] = False,
            db: DbOption = None, table: TableOption = None,
            storage_option: StorageOption = None, as_json: JsonOption = False) -> None:
    """Propose the next chips to label (starting the session's next round unless --dry-run)."""
    from chipscout.indexer.seedsets import refine

    engine, store = _labels(db, table, storage_option)
    run = refine.propose if dry_run else refine.next_round
    result = run(engine, name, n, uncertain=uncertain, strategy=strategy, spread_km=spread_km,
                 per_cell=per_cell, labels=store, **_options(beta))
    if as_json:
        _print_json(result.to_dict())
        return
    typer.echo(f"session {result.session!r} round {result.round}: {len(result.proposals)} proposal(s) by "
               f"{result.strategy} ({result.score_kind})")
    if result.note:
        typer.echo(f"note: {result.note}")
    for p in result.proposals:
        typer.echo(f"{p.rank:>4}  {p.score:>8.4f}  {p.kind:9}  {p.chip.center_lon:>9.4f}  "
                   f"{p.chip.center_lat:>8.4f}  {p.chip.chip_id}")
    if result.metrics:
        typer.echo(_metrics_text(result.metrics))


def _metrics_text(metrics) -> str:
    cv, change = metrics.cross_validation, metrics.ranking_change

    def number(value):
        return "n/a" if value is None else f"{value:.3f}"

    lines = [f"labels: {metrics.n_positive} positive, {metrics.n_negative} negative (round {metrics.round})"]
    if cv.method:
        lines.append(f"classifier ({cv.method}): precision {number(cv.precision)}, recall {number(cv.recall)}"
                     + (f"  ({cv.note})" if cv.note else ""))
    else:
        lines.append(f"classifier: {cv.note}")
    if change.compared:
        lines.append(f"ranking vs round {change.previous_round}: Jaccard {number(change.jaccard)} of top "
                     f"{change.compared}, rank correlation {number(change.rank_correlation)}")
    else:
        lines.append(f"ranking change: {change.note}")
    return "\n".join(lines)


@label_app.command("metrics")
@default_table
def metrics(name: SessionArg, strategy: StrategyOption = None, beta: BetaOption = None,
            db: DbOption = None, table: TableOption = None,
            storage_option: StorageOption = None, as_json: JsonOption = False) -> None:
    """How good the seed set is: cross-validated classifier precision/recall, ranking stability."""
    from chipscout.indexer.seedsets import refine

    engine, store = _labels(db, table, storage_option)
    result = refine.seed_set_metrics(engine, name, strategy=strategy, labels=store, **_options(beta))
    rounds = store.rounds(name)
    if as_json:
        _print_json({**result.to_dict(), "rounds": [r.to_dict() for r in rounds]})
    else:
        typer.echo(_metrics_text(result))


@label_app.command("import")
@default_table
def import_places(name: SessionArg, path: Annotated[Path, typer.Argument(help="GeoJSON of points or polygons (WGS 84).")],
                  negative: Annotated[bool, typer.Option("--negative", help="Label the chips negative.")] = False,
                  no_create: Annotated[bool, typer.Option("--no-create", help="Fail if the session does not exist.")] = False,
                  date_from: Annotated[Optional[str], typer.Option("--from", help="Only chips acquired on or after.")] = None,
                  date_to: Annotated[Optional[str], typer.Option("--to", help="Only chips acquired on or before.")] = None,
                  by: ByOption = None, db: DbOption = None, table: TableOption = None,
                  storage_option: StorageOption = None,
                  as_json: JsonOption = False) -> None:
    """Label the chips intersecting a GeoJSON's features (creating the session if needed)."""
    from chipscout.indexer.seedsets.export import import_geojson
    from chipscout.indexer.search.engine import SearchFilters

    engine, store = _labels(db, table, storage_option)
    filters = SearchFilters.build(date_from, date_to)
    summary = import_geojson(engine, path, name, label="negative" if negative else "positive",
                             create=not no_create, by=by, filters=filters, labels=store)
    if as_json:
        _print_json(summary.to_dict())
    else:
        typer.echo(f"{'created' if summary.created else 'extended'} session {name!r}: {len(summary.chips)} chip(s) "
                   f"labelled {summary.label} from {summary.features} feature(s)"
                   + (f"; features {summary.unmatched_features[:10]} meet no chip" if summary.unmatched_features else ""))


@default_table
def export_command(
    name: SessionArg,
    fmt: Annotated[Optional[str], typer.Option("--format", help="geojson or geoparquet (default: from --out's suffix).")] = None,
    out: Annotated[Path, typer.Option("--out", help="File to write.")] = Path("seedset.geojson"),
    candidates: Annotated[int, typer.Option("--candidates", help="Also export the top N unlabelled chips as candidates.")] = 0,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Only candidates scoring at least this.")] = None,
    strategy: StrategyOption = None, beta: BetaOption = None,
    db: DbOption = None, table: TableOption = None,
    storage_option: StorageOption = None, as_json: JsonOption = False,
) -> None:
    """Export a labelling session (and optional candidates) as GeoJSON or GeoParquet."""
    from chipscout.indexer.seedsets.export import export_session

    engine, store = _labels(db, table, storage_option)
    summary = export_session(engine, name, out, fmt, candidates=candidates, threshold=threshold,
                             strategy=strategy, labels=store, **_options(beta))
    if as_json:
        _print_json(summary.to_dict())
    else:
        extra = f", {summary.candidates} candidates ({summary.candidate_strategy})" if candidates else ""
        typer.echo(f"wrote {summary.path}: {summary.positives} positive, {summary.negatives} negative{extra}")
        if summary.note:
            typer.echo(f"note: {summary.note}")
