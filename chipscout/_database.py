"""`connect` -> `Database` -> `Table`: a chip database as a notebook sees it. Every method hands
over to `chipscout.indexer.search` and `chipscout.indexer.seedsets`, imported when first needed so
that `import chipscout` stays light (no torch, no LanceDB)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from chipscout._filters import Filters
from chipscout._results import Results
from chipscout.indexer.errors import QueryError

if TYPE_CHECKING:
    import numpy as np

    from chipscout.indexer.search import ChipRecord, SearchEngine
    from chipscout.indexer.store import IndexConfig
    from chipscout.indexer.seedsets import ExportSummary
    from chipscout.indexer.seedsets import Label, LabelStore, Session


def connect(uri: str | Path | None = None, storage_options: Mapping[str, str] | None = None) -> Database:
    """The chip database at `uri`: a folder or an object-store URI (`s3://bucket/db`, with
    `storage_options` for credentials and endpoint). None: the CLI's default database
    (`$CHIPSCOUT_DB`, else ~/.local/share/chipscout/db)."""
    if uri is None:
        from chipscout.indexer.paths import default_db_uri

        uri = default_db_uri()
    return Database(str(uri), dict(storage_options) if storage_options else None)


class Database:
    """The chip tables of one database."""

    def __init__(self, uri: str, storage_options: dict[str, str] | None = None):
        self.uri = uri
        self.storage_options = storage_options

    def __repr__(self) -> str:
        return f"<chipscout.Database {self.uri!r}>"

    def table_names(self) -> list[str]:
        """The chip tables (companion tables of labels and fitted state are left out)."""
        from chipscout.indexer.store import ChipStore

        return ChipStore(self.uri, "chips", self.storage_options).table_names()

    def open_table(self, name: str = "chips") -> Table:
        """The chip table `name`; a missing one raises `chipscout.StoreError` naming those there are."""
        from chipscout.indexer.search import SearchEngine

        return Table(SearchEngine(self.uri, name, self.storage_options), self)


class Table:
    """One chip table: search it, and label its chips into seed-set sessions."""

    def __init__(self, engine: SearchEngine, database: Database):
        self.engine = engine
        self.database = database
        self._labels: LabelStore | None = None

    @property
    def name(self) -> str:
        return self.engine.table_name

    def __repr__(self) -> str:
        return f"<chipscout.Table {self.name!r} of {self.database.uri!r}>"

    def __len__(self) -> int:
        return self.engine.count()

    @property
    def config(self) -> IndexConfig:
        """What the table records about its vectors: encoder and parameters, bands, dimension..."""
        return self.engine.config

    # ------------------------------------------------------------------ search
    def chip_at(self, lon: float, lat: float | None = None) -> ChipRecord:
        """The chip containing the point (`lon`, `lat`), or, given a box (MINLON, MINLAT, MAXLON,
        MAXLAT) as `lon` alone, the chip covering most of it: a query example from a place."""
        place = (lon, lat) if lat is not None else lon
        return self.engine.chip_at(place)  # type: ignore[arg-type]

    def search(self, query: str | Sequence[float] | np.ndarray | None = None, k: int = 10, *,
               filters: Filters | None = None, expand: int | None = None,
               exclude: Sequence[str] = (), at: Sequence[float] | str | None = None,
               where: bool | str = False, rank_by: str = "chip",
               cell: tuple[int, int] | None = None, pool: int | None = None) -> Results:
        """The `k` chips most like `query`, a chip id of this table or a vector of its dimension,
        that `filters` allow. `expand`: results folded into the query (None: the table's default,
        0: plain nearest neighbours). `exclude`: chip ids to leave out (vector queries; a chip
        query always leaves out itself). `at`: (lon, lat) or a box instead of `query`: the chip
        there is the example (`chip_at`).

        Where in each chip (docs/where-and-change.md): `where=True` (or "pixels" / "patches")
        gives every result a heatmap (`Results.heatmaps`); `rank_by="cell"` orders the whole-chip
        search's top `pool` by their best-matching cell; `cell=(row, col)` searches for one cell
        of the query chip (a small thing) instead of the whole chip. Each implies `where`."""
        if (query is None) == (at is None):
            raise QueryError("give a query (a chip id or a vector) or at=(lon, lat), one of the two")
        if at is not None:
            query = self.engine.chip_at(at).chip_id
        if filters is not None and not isinstance(filters, Filters):
            raise QueryError(f"filters must be a chipscout.Filters, got {type(filters).__name__}")
        if rank_by not in ("chip", "cell"):
            raise QueryError(f"rank_by must be 'chip' or 'cell', got {rank_by!r}")
        compiled = filters.compiled() if filters is not None else None
        if isinstance(query, str) and exclude:
            raise QueryError("exclude is for vector queries; a chip query leaves out only itself")
        if where or rank_by == "cell" or cell is not None:
            from chipscout.indexer.search import search_where

            use = where if isinstance(where, str) else "auto"
            answer = search_where(self.engine, query, k, compiled, expand=expand, cell=cell,
                                  rank_by_cell=rank_by == "cell", pool=pool, use=use, exclude_ids=exclude)
            return Results(answer.response, answer.heatmaps)
        if isinstance(query, str):
            return Results(self.engine.similar_to_chip(query, k, compiled, expand))
        return Results(self.engine.similar_to_vector(query, k, compiled, exclude, expand))

    def change(self, location: str, before: str, after: str, k: int = 10, *, filters: Filters | None = None,
               other_before: str | None = None, other_after: str | None = None, method: str = "residual",
               min_overlap: float = 0.5, spread_km: float = 0.0, per_cell: int = 1):
        """Places whose change from `other_before` to `other_after` (default: `before`, `after`) is
        most like the change at `location`'s place (a chip id of any date there) from `before` to
        `after`: a `ChangeResponse` of before/after pairs (docs/where-and-change.md)."""
        from chipscout.indexer.search import ChangeSearch, Spread

        if filters is not None and not isinstance(filters, Filters):
            raise QueryError(f"filters must be a chipscout.Filters, got {type(filters).__name__}")
        compiled = filters.compiled() if filters is not None else None
        spread = Spread(spread_km, per_cell) if spread_km else None
        return ChangeSearch(self.engine).search(location, before, after, k, compiled, other_before=other_before,
                                                other_after=other_after, method=method, min_overlap=min_overlap,
                                                spread=spread)

    def heatmaps(self, results: Results, query: str | Sequence[float] | np.ndarray | None = None, *,
                 session: str | None = None, use: str = "auto") -> list:
        """A `Heatmap` per result of `results`: each cell's similarity to `query` (a chip id or a
        vector; default: the results' query chip) or to the mean of `session`'s positives."""
        from chipscout.indexer.search import WhereInChip

        if session is not None:
            from chipscout.indexer.seedsets import mean_query

            positives = [c for c, label in self.labels(session).items() if label == "positive"]
            _, vectors = self.engine.vectors(positives)
            vector = mean_query(vectors)
        elif query is None:
            if results.query_chip_id is None:
                raise QueryError("these results came from a vector: pass the query vector (or a session)")
            vector = self.engine.get_vector(results.query_chip_id)
        else:
            vector = self.engine.get_vector(query) if isinstance(query, str) else query
        return WhereInChip(self.engine).heatmaps([r.chip for r in results], vector, use)

    def sample(self, n: int = 10, seed: int = 0) -> list[ChipRecord]:
        """`n` chips picked at random (the same for the same `seed`), to look at or start from."""
        return self.engine.sample(n, seed=seed)

    def chip(self, chip_id: str) -> ChipRecord:
        """The stored record of one chip (footprint, date, source, quality figures)."""
        return self.engine.get_chip(chip_id)

    def vector(self, chip_id: str) -> np.ndarray:
        """The stored vector of one chip, to search with, average or compare."""
        return self.engine.get_vector(chip_id)

    # ------------------------------------------------------------------ seed sets
    @property
    def label_store(self) -> LabelStore:
        """The table's labelling sessions (`chipscout.indexer.seedsets.labels.LabelStore`)."""
        if self._labels is None:
            from chipscout.indexer.seedsets import LabelStore

            self._labels = LabelStore.open(self.database.uri, self.name, self.database.storage_options)
        return self._labels

    def sessions(self) -> list[Session]:
        return self.label_store.sessions()

    def session(self, name: str, *, create: bool = True, strategy: str = "auto", notes: str = "") -> Session:
        """The labelling session `name`, created (with `strategy`, `notes`) when it does not exist
        and `create` is true."""
        store = self.label_store
        if create and not store.exists(name):
            return store.create_session(name, strategy=strategy, notes=notes)
        return store.session(name)

    def label(self, session: str | Session, chip_ids: str | Sequence[str], label: str | bool = "positive",
              *, by: str | None = None) -> list[Label]:
        """Label chips of the session in one write: `label` is 'positive' or 'negative' (or True/False).
        The session must exist (`session(name)` makes it); unknown chips label nothing."""
        ids = [chip_ids] if isinstance(chip_ids, str) else list(chip_ids)
        return self.label_store.set_labels(session, dict.fromkeys(ids, label), by=by, origin="python")

    def unlabel(self, session: str | Session, chip_ids: str | Sequence[str]) -> int:
        """Forget the labels of `chip_ids` in the session; returns how many there were."""
        ids = [chip_ids] if isinstance(chip_ids, str) else list(chip_ids)
        return self.label_store.remove_labels(session, ids)

    def labels(self, session: str | Session) -> dict[str, str]:
        """{chip_id: 'positive' | 'negative'} of the session."""
        return self.label_store.label_map(session)

    def export(self, session: str | Session, path: str | Path, format: str | None = None, *,
               candidates: int = 0, threshold: float | None = None) -> ExportSummary:
        """Write the session's labelled chips (and optionally the best `candidates` unlabelled
        chips scoring at least `threshold`) to GeoJSON or GeoParquet (`format`, else from the suffix)."""
        from chipscout.indexer.seedsets import export_session

        return export_session(self.engine, session, path, format, candidates=candidates,
                              threshold=threshold, labels=self.label_store)
