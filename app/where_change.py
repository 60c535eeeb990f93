"""The page's where-in-the-chip heatmaps and its search-by-change mode (issue #20), kept in one
module so the page (`app/main.py`) only calls in. A thin layer over `chipscout.indexer.search`
(`WhereInChip`, `ChangeSearch`): no LanceDB, no SQL, no torch here (the search package loads the
table's encoder when a heatmap is asked for)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

import streamlit as st

from chipscout.indexer.errors import ChipscoutError
from chipscout.indexer.search import (ChangeSearch, ChipRecord, SearchEngine, WhereInChip, overlay_png,
                                      pair_png)

#: Session key of the sidebar toggle.
TOGGLE = "show_heatmaps"
CHANGE_K = 6
PAIR_COLUMNS = 4


def sidebar_toggle() -> None:
    st.checkbox("Show where in each chip it matches (heatmaps)", key=TOGGLE,
                help="Colours each result's cells by their similarity to the example (red = best cell of "
                     "that chip), over its thumbnail and its footprint on the map. Computed for the results "
                     "shown by reading their pixels again (about half a second per chip with RCF on two "
                     "cores), or from stored patch vectors for --pooling patch tables.")


@st.cache_data(show_spinner="Working out where in each chip it matches...", max_entries=64)
def _heatmap_pngs(db_uri: str, table: str, version: int, query_id: str, chip_ids: tuple[str, ...],
                  _engine: SearchEngine, _chips: Sequence[ChipRecord],
                  _thumbnails: Mapping[str, bytes | None]) -> tuple[dict[str, bytes], dict[str, str]]:
    heatmaps = WhereInChip(_engine).heatmaps(list(_chips), _engine.get_vector(query_id))
    pngs = {h.chip_id: overlay_png(h, _thumbnails.get(h.chip_id)) for h in heatmaps if h.ok}
    notes = {h.chip_id: h.note for h in heatmaps if not h.ok}
    return pngs, notes


def with_heatmaps(db_uri: str, table: str, engine: SearchEngine, query: ChipRecord, chips: Sequence[ChipRecord],
                  thumbnails: Mapping[str, bytes | None]) -> dict[str, bytes | None]:
    """`thumbnails` with each result's heatmap drawn over it when the toggle is on (the example keeps
    its plain thumbnail); chips whose heatmap cannot be made keep theirs and get a visible note."""
    if not st.session_state.get(TOGGLE) or not chips:
        return dict(thumbnails)
    try:
        pngs, notes = _heatmap_pngs(db_uri, table, engine.version, query.chip_id,
                                    tuple(c.chip_id for c in chips), engine, list(chips), dict(thumbnails))
    except ChipscoutError as err:
        st.warning(f"No heatmaps: {err}")
        return dict(thumbnails)
    st.caption("Heatmaps: each result's cells coloured by similarity to the example, from blue (its "
               "least similar cell) to red (its most similar).")
    for chip_id, note in notes.items():
        st.warning(f"No heatmap for `{chip_id}`: {note}")
    return {**thumbnails, **pngs}


# ----------------------------------------------------------------------------- search by change
def _day(when: datetime) -> str:
    return when.date().isoformat()


@st.cache_data(show_spinner=False, max_entries=256)
def _place_dates(db_uri: str, table: str, version: int, chip_id: str, _engine: SearchEngine) -> list[str]:
    search = ChangeSearch(_engine)
    return sorted({_day(d) for d in search.place_dates(_engine.get_chip(chip_id))})


def change_panel(db_uri: str, table: str, engine: SearchEngine, query: ChipRecord,
                 thumbnails: Callable[[tuple[str, ...]], dict[str, bytes | None]],
                 show_map: Callable[[list, ChipRecord], None]) -> None:
    """Pick two dates the table holds at the example's place; see other places whose change between
    the same dates looks alike, before and after side by side, and on a map."""
    with st.expander("Search by this place's change between two dates", expanded=False):
        dates = _place_dates(db_uri, table, engine.version, query.chip_id, engine)
        if len(dates) < 2:
            st.info(f"The table holds this place at {len(dates)} date(s) ({', '.join(dates) or 'none'}); a change "
                    "needs two: index it again at another date.")
            return
        before_column, after_column, k_column = st.columns([2, 2, 1])
        before = before_column.selectbox("Before", dates, index=0, key="change_before")
        after = after_column.selectbox("After", dates, index=len(dates) - 1, key="change_after")
        k = k_column.number_input("Places", min_value=1, max_value=50, value=CHANGE_K, key="change_k")
        if not st.toggle("Search by this change", key="change_on"):
            return
        try:
            response = ChangeSearch(engine).search(query.chip_id, before, after, int(k))
        except ChipscoutError as err:
            st.error(f"Cannot search by change: {err}")
            return
        st.caption(f"{len(response.results)} places whose change {before} -> {after} looks most like this one's "
                   f"({response.pairs_compared} compared, {response.elapsed_ms:.0f} ms, {response.method}). "
                   "Each row: before | after.")
        pairs = [response.query] + [r.pair for r in response.results]
        pngs = thumbnails(tuple(c.chip_id for p in pairs for c in (p.before, p.after)))
        captions = ["**the example**"] + [f"**#{r.rank}** · {r.similarity:.4f} · `{r.pair.after.chip_id}`"
                                          for r in response.results]
        with st.container(key="change-pairs"):
            for start in range(0, len(pairs), PAIR_COLUMNS):
                for column, pair, caption in zip(st.columns(PAIR_COLUMNS), pairs[start:start + PAIR_COLUMNS],
                                                 captions[start:start + PAIR_COLUMNS]):
                    with column:
                        st.image(pair_png(pngs.get(pair.before.chip_id), pngs.get(pair.after.chip_id)),
                                 width="stretch")
                        st.caption(caption)
        if response.results:
            show_map(response.results, response.query.after)
