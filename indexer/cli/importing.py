"""`chipscout import`: a chip-level embedding product (GeoParquet) into a chip table.

No `from __future__ import annotations`: typer reads these annotations at runtime. Nothing heavy
is imported at module level (the importer loads pyarrow, shapely and the store when it runs).
"""

from typing import Annotated, Optional

import typer

from chipscout.indexer.cli.options import DbOption, JsonOption, ProgressOpt, StorageOption, TableOption, db_uri, print_json, storage_options


def import_command(
    uri: Annotated[str, typer.Argument(help="GeoParquet file: a path, s3://bucket/key or an http(s) URL (read with Range requests).")],
    preset: Annotated[Optional[str], typer.Option("--preset", help="Layout: major-tom, clay, earth-index (or survey). Default: from the file (an 'emb' metadata key means the survey layout).")] = None,
    vector_column: Annotated[Optional[str], typer.Option("--vector-column", help="Column of the vectors (lists of numbers).")] = None,
    geometry_column: Annotated[Optional[str], typer.Option("--geometry-column", help="Column of the footprints (WKB).")] = None,
    id_column: Annotated[Optional[str], typer.Option("--id-column", help="Column of the chip ids (default: the row number).")] = None,
    datetime_column: Annotated[Optional[str], typer.Option("--datetime-column", help="Column of the acquisition dates.")] = None,
    product: Annotated[Optional[str], typer.Option("--product", help="Name the table records for the product (default: the preset).")] = None,
    batch_rows: Annotated[Optional[int], typer.Option("--batch-rows", help="Rows read and written at a time.")] = None,
    memory: Annotated[Optional[str], typer.Option("--memory", help="Size batches to stay within about this much memory (bytes, or e.g. 512MiB, 2GiB: the syntax of search's --memory).")] = None,
    db: DbOption = None,
    table: TableOption = "chips",
    as_json: JsonOption = False,
    progress: ProgressOpt = True,
    storage_option: StorageOption = None,
) -> None:
    """Import published chip embeddings (Major TOM, Clay, Earth Index, ...) into a table; rerun to resume."""
    from chipscout.indexer.ingest.importing import import_product
    from chipscout.indexer.store.indexes import parse_memory

    memory_mb = None if memory is None else parse_memory(memory) / 2**20

    bar = None
    if progress and not as_json:
        from tqdm.auto import tqdm

        bar = tqdm(total=0, unit="row", desc="importing", dynamic_ncols=True)

    def advance(done: int, total: int | None) -> None:
        if bar is not None:
            bar.total = total or 0
            bar.n = done
            bar.refresh()

    try:
        summary = import_product(
            uri, db_uri(db), table, preset_name=preset,
            columns={"vector": vector_column, "geometry": geometry_column, "id": id_column,
                     "datetime": datetime_column},
            product_name=product, batch_rows=batch_rows, memory_budget_mb=memory_mb,
            storage_options=storage_options(storage_option), progress=advance)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        print_json(summary.to_dict())
        return
    typer.echo(f"{summary.table}: {summary.rows_new} new chips from {summary.uri} ({summary.product}), "
               f"{summary.rows_present} already present; {summary.table_rows} rows in table; "
               f"{summary.rows_per_s:.0f} rows/s")
