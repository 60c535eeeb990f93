"""chipscout's Streamlit page: pick an example chip, see the places that look like it.

Run with `chipscout app` (or `streamlit run app/main.py -- --db PATH --table NAME`). A thin layer
over `chipscout.indexer.search` (and, for labelling, `app/labelling.py`): no LanceDB, SQL or torch here. The
page reads top to bottom: settings from the link, the sidebar controls, the open labelling session's
panel, the example, its look-alikes (histogram, grid, map), then the gallery and map to pick another
example from. The labelling panel with the example and its look-alikes, and the gallery with its map,
are fragments (`st.fragment`), so a label click or a page turn reruns and re-sends only its part;
map pictures and thumbnails come by URL when `app/server.py` serves the page (`images.py`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from datetime import date
from functools import partial
from typing import Any
from urllib.parse import urlencode, urlsplit

import altair as alt
import pandas as pd
import streamlit as st

from chipscout.app import images, labelling, maps, state, where_change
from chipscout.indexer.errors import ChipscoutError
from chipscout.indexer.paths import default_db_uri
from chipscout.indexer.search import ChipRecord, SearchEngine, SearchFilters, SearchResponse, Spread

SENTINEL_ATTRIBUTION = "Contains modified Copernicus Sentinel data."
GALLERY_SIZE = 12
GRID_COLUMNS = 6
#: Footprints drawn on the pick-an-example map (a sample when the table is larger).
OVERVIEW_MAX_CHIPS = 2000
#: Chips whose small thumbnails form the maps' mosaic (one picture, fetched once by URL).
MOSAIC_MAX_CHIPS = 1000
DATE_LIMITS = state.DATE_LIMITS
#: The page's fragments (`st.fragment` keys): a widget in one reruns only it, unless it changes the example.
PANEL, GALLERY = labelling.PANEL_FRAGMENT, "gallery"


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--db", default=None)
    parser.add_argument("--table", default="chips")
    parser.add_argument("--memory", default=None)  # the warm path's budget (`chipscout app --memory`)
    known, _ = parser.parse_known_args(sys.argv[1:])
    known.db = known.db or default_db_uri()
    return known


# ----------------------------------------------------------------------------- cached search API calls
@st.cache_resource(show_spinner="Loading the chip table into memory...")
def search_engine(db_uri: str, table: str) -> SearchEngine:
    engine = SearchEngine(db_uri, table, memory=_arguments().memory)
    engine.warm_up()  # an app answers many queries: keep what they read in memory (the first page waits)
    engine.warm_up(wait=False)  # later versions are absorbed or loaded in the background; queries go cold meanwhile
    return engine


@st.cache_data(show_spinner=False, max_entries=4096)
def thumbnails(db_uri: str, table: str, chip_ids: tuple[str, ...]) -> dict[str, bytes | None]:
    return search_engine(db_uri, table).thumbnails(list(chip_ids))


@st.cache_data(show_spinner=False, max_entries=512)
def chip_record(db_uri: str, table: str, row_count: int, chip_id: str) -> ChipRecord:
    return search_engine(db_uri, table).get_chip(chip_id)


@st.cache_data(show_spinner=False, max_entries=64)
def gallery_page(db_uri: str, table: str, row_count: int, seed: int, page: int) -> list[ChipRecord]:
    engine = search_engine(db_uri, table)
    if page == 0:  # one chip of each kind of place first (k-means on the vectors), then random pages
        return engine.diverse_sample(GALLERY_SIZE, seed=seed)
    return engine.sample(GALLERY_SIZE, seed=seed, offset=page * GALLERY_SIZE)


@st.cache_data(show_spinner=False, max_entries=8)
def overview_chips(db_uri: str, table: str, row_count: int) -> list[ChipRecord]:
    return search_engine(db_uri, table).sample(min(row_count, OVERVIEW_MAX_CHIPS), seed=0)


@st.cache_data(show_spinner=False, max_entries=8)
def overview_mosaic(db_uri: str, table: str, row_count: int) -> maps.Mosaic | None:
    """One picture of the overview's small thumbnails, drawn under both maps (the same URL)."""
    chips = overview_chips(db_uri, table, row_count)[:MOSAIC_MAX_CHIPS]
    return maps.mosaic(chips, thumbnails(db_uri, table, tuple(c.chip_id for c in chips)))


@st.cache_data(show_spinner=False, max_entries=256)
def look_alikes(db_uri: str, table: str, row_count: int, chip_id: str, k: int, filters_key: str,
                spread_km: float, per_cell: int, expand: int, _filters: SearchFilters) -> SearchResponse:
    spread = Spread(spread_km, per_cell) if spread_km > 0 else None
    return search_engine(db_uri, table).similar_to_chip(chip_id, k, _filters, expand=expand, spread=spread)


def table_default_expand(db_uri: str, table: str) -> int:
    """The table's query expansion; 0 when it cannot be opened (the page says why further down)."""
    try:
        return search_engine(db_uri, table).default_expand
    except ChipscoutError:
        return 0


# ----------------------------------------------------------------------------- callbacks (run before the page)
def use_as_example(chip_id: str) -> None:
    st.session_state.chip_id = chip_id
    st.session_state.min_similarity = None
    st.rerun()  # the buttons and maps are in fragments; a new example changes the whole page


def example_from_map(map_key: str, layer_ids: tuple[str, ...]) -> None:
    chip_id = maps.selected_chip_id(st.session_state.get(map_key), layer_ids)
    if chip_id:
        use_as_example(chip_id)


def clear_threshold() -> None:
    st.session_state.min_similarity = None


def set_area(bbox_text: str) -> None:
    st.session_state.bbox = bbox_text
    st.rerun()  # the sidebar's area filter changes every search


def turn_gallery(pages: int, step: int) -> None:
    st.session_state.gallery_page = (st.session_state.gallery_page + step) % pages
    st.rerun(GALLERY)  # what a click in the gallery does anyway, said so that AppTest does it too


def shuffle_gallery() -> None:
    st.session_state.gallery_seed += 1
    st.session_state.gallery_page = 0
    st.rerun(GALLERY)


# ----------------------------------------------------------------------------- page helpers
def sync_link() -> dict[str, str]:
    """Write the current settings into the page URL (only when they changed) and return them."""
    params = state.to_query_params(state.from_session(st.session_state, st.session_state.table),
                                   st.session_state.default_expand)
    if st.session_state.get(labelling.SESSION):  # the open labelling session travels with the link
        params[labelling.LINK_PARAM] = st.session_state[labelling.SESSION]
    if st.query_params.to_dict() != params:
        st.query_params.from_dict(params)
    return params


def chip_date(chip: ChipRecord) -> str:
    return chip.acquired.date().isoformat() if chip.acquired else "date unknown"


def fraction_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def score_digits(similarities: list[float]) -> int:
    """Decimals that tell these scores apart (raw RCF scores can differ only in the fifth digit)."""
    spread = max(similarities) - min(similarities)
    return 4 if spread <= 0 else min(8, max(4, 2 - math.floor(math.log10(spread))))


def similarity_threshold(similarities: list[float]) -> float | None:
    """A histogram of the scores with a slider; returns the similarity below which results hide."""
    low, high = min(similarities), max(similarities)
    current = st.session_state.min_similarity
    chart = alt.Chart(pd.DataFrame({"similarity": similarities})).mark_bar().encode(
        x=alt.X("similarity:Q", bin=alt.Bin(maxbins=25), title="similarity"),
        y=alt.Y("count():Q", title="results"))
    if current is not None:
        chart += alt.Chart(pd.DataFrame({"threshold": [current]})).mark_rule(color="red", size=2).encode(
            x="threshold:Q")
    st.altair_chart(chart.properties(height=140), width="stretch")
    if high - low < 1e-9:
        st.caption("All results have the same similarity; there is nothing to threshold.")
        return current
    # The slider spans the scores shown (they often bunch near 1) plus any threshold from the link.
    slider_low = low if current is None else min(low, current)
    slider_high = high if current is None else max(high, current)
    chosen = st.slider("Hide results below similarity", slider_low, slider_high,
                       value=slider_low if current is None else current,
                       step=(slider_high - slider_low) / 200, format=f"%.{score_digits(similarities)}f")
    chosen = None if chosen <= low else chosen
    if chosen != current:
        st.session_state.min_similarity = chosen
        sync_link()
    return chosen


def thumbnail_grid(container_key: str, chips: list[ChipRecord], captions: list[str], button_prefix: str,
                   pngs: dict[str, bytes | None], seed: labelling.Seed | None = None,
                   scores: dict[str, float] | None = None, strategy: str | None = None,
                   fragment: str | None = None) -> None:
    """Thumbnails with captions and a "Use <chip>" button (it makes the chip the example); with a labelling session open, also
    each chip's label and thumbs-up / thumbs-down buttons (`scores`, `strategy`: the ranking the chips
    are shown from, stored with their labels; `fragment`: the page fragment drawing the grid)."""
    with st.container(key=container_key):
        for start in range(0, len(chips), GRID_COLUMNS):
            for column, chip, caption in zip(st.columns(GRID_COLUMNS), chips[start:start + GRID_COLUMNS],
                                             captions[start:start + GRID_COLUMNS]):
                with column:
                    png = pngs.get(chip.chip_id)
                    if png:
                        show_picture(png)
                    else:
                        st.caption("(no thumbnail)")
                    st.caption(caption)
                    if seed is not None:
                        labelling.label_buttons(seed, chip.chip_id, button_prefix, strategy=strategy,
                                                score=(scores or {}).get(chip.chip_id), fragment=fragment)
                    st.button(f"Use {short_chip_name(chip.chip_id)}", key=f"{button_prefix}-{chip.chip_id}",
                              help=f"Use {chip.chip_id} as the example",
                              on_click=use_as_example, args=(chip.chip_id,), width="stretch")


def show_picture(png: bytes) -> None:
    """A thumbnail in the page. Where the server serves the maps' pictures, by that same URL: the
    browser fetches each picture once for the grid and the map and keeps it (`immutable`), and no
    per-session media file is made each rerun. Else (AppTest) as PNG bytes, which Streamlit then
    does not re-encode."""
    page = urlsplit(st.context.url or "")
    if images.served() and page.scheme in ("http", "https"):
        st.image(f"{page.scheme}://{page.netloc}{images.src(png)}", width="stretch")
    else:
        st.image(png, width="stretch", output_format="PNG")


def short_chip_name(chip_id: str) -> str:
    """What tells a chip from its neighbours in a grid, for its button's label (screen readers read
    the label, not the tooltip): `r720 c1280` for chipscout's ids, else the id's last 16 characters."""
    grid = re.search(r"_r(\d+)_c(\d+)_s\d+$", chip_id)
    if grid:
        return f"r{int(grid.group(1))} c{int(grid.group(2))}"
    return chip_id if len(chip_id) <= 16 else "…" + chip_id[-15:]


def proposals_grid(db_uri: str, table: str, seed: labelling.Seed, chips: list[ChipRecord], captions: list[str],
                   key: str, scores: dict[str, float], strategy: str) -> None:
    pngs = thumbnails(db_uri, table, tuple(c.chip_id for c in chips))
    if chips:
        st.caption("Map: this round's proposals, orange until labelled, then green (positive) or red "
                   "(negative). Click one to search from it.")
        # `basemap_url`: the page's, checked above before the labelling panel draws this.
        show_map(lambda: maps.proposals_deck(chips, captions, pngs, seed.label_map, basemap_url,
                                             st.session_state.map_thumbnails, image_src=images.src),
                 ("proposals", tuple(c.chip_id for c in chips), tuple(captions),
                  labels_of(seed, (c.chip_id for c in chips)), basemap_url, st.session_state.map_thumbnails),
                 f"{key}-map", (maps.PROPOSALS_LAYER,), f"Map of {len(chips)} proposals of this round")
    thumbnail_grid(f"{key}-grid", chips, captions, key, pngs, seed, scores, strategy, PANEL)


def extent_text(chips: list[ChipRecord]) -> str:
    boxes = [c.footprint.bounds for c in chips]
    return ",".join(f"{v:.5f}" for v in (min(b[0] for b in boxes), min(b[1] for b in boxes),
                                           max(b[2] for b in boxes), max(b[3] for b in boxes)))


@st.cache_resource(show_spinner=False, max_entries=48)
def serialized_deck(inputs: str, _build: Callable[[], Any]) -> Any:
    """The deck `_build` makes, serialised once: the same map on a later rerun (a label click, a
    filter that leaves the results alone) costs neither the thumbnails' data URIs nor pydeck's
    JSON encoding again, which were most of a rerun's server time (BENCHMARKS.md, app latency).
    `inputs`: everything the deck depends on, the table version included."""
    deck = _build()
    # pydeck indents its JSON (2 spaces a level): compact, a deck is about half the bytes to send.
    spec = json.dumps(json.loads(deck.to_json()), separators=(",", ":"))
    deck.to_json = lambda: spec  # what st.pydeck_chart calls
    return deck


def show_map(build: Callable[[], Any], inputs: tuple, key: str, layer_ids: tuple[str, ...], alt_text: str) -> None:
    deck = serialized_deck(repr((db_uri, table, table_version, inputs)), build)
    st.pydeck_chart(deck, key=key, height=maps.MAP_HEIGHT_PX, on_select=partial(example_from_map, key, layer_ids),
                    selection_mode="single-object", alt=alt_text)


def labels_of(seed: labelling.Seed | None, chip_ids: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """The open session's labels of these chips, as a cache key."""
    if seed is None:
        return ()
    labels = seed.label_map
    return tuple((c, labels[c]) for c in chip_ids if c in labels)


# ============================================================================= the page
st.set_page_config(page_title="chipscout", layout="wide")
args = _arguments()

# Settings come from the link on a browser session's first run, then live in the widgets.
if "settings_loaded" not in st.session_state:
    from_link, link_problems = state.from_query_params(st.query_params.to_dict(), args.table)
    st.session_state.update(state.as_session_values(from_link))
    st.session_state.update(settings_loaded=True, link_problems=link_problems, gallery_seed=0, gallery_page=0,
                            basemap_url=os.environ.get("CHIPSCOUT_BASEMAP_URL", ""), map_thumbnails=True)
    labelling.open_from_link(st.query_params.get(labelling.LINK_PARAM))
db_uri, table = args.db, st.session_state.table
if "default_expand" not in st.session_state:  # the table's query expansion, for the widget and the link
    st.session_state.default_expand = table_default_expand(db_uri, table)
    if st.session_state.expand is None:
        st.session_state.expand = st.session_state.default_expand

with st.sidebar:
    seed_box = st.container()  # the labelling session picker, filled once the table is open
    st.header("Example chip")
    st.text_input("Chip id", key="chip_id", on_change=clear_threshold,
                  placeholder="paste an id, or pick from the gallery or map")
    st.header("Search")
    st.slider("Look-alikes (k)", *state.K_RANGE, key="k")
    date_from_column, date_to_column = st.columns(2)
    date_from_column.date_input("From", key="date_from", min_value=DATE_LIMITS[0], max_value=DATE_LIMITS[1],
                                format="YYYY-MM-DD")
    date_to_column.date_input("To", key="date_to", min_value=DATE_LIMITS[0], max_value=DATE_LIMITS[1],
                              format="YYYY-MM-DD")
    st.text_input("Area: min lon, min lat, max lon, max lat", key="bbox", placeholder="e.g. -75.70,37.55,-75.55,37.70",
                  help="Only chips whose footprint box meets this box. Streamlit cannot read back the map's "
                       "current view, so type a box or use the button under the results map.")
    st.slider("Max cloud fraction", 0.0, 1.0, step=0.05, key="max_cloud",
              help="Chips without a cloud mask always pass. 1 turns the filter off.")
    st.slider("Max nodata fraction", 0.0, 1.0, step=0.05, key="max_nodata", help="1 turns the filter off.")
    st.checkbox("Exclude chips overlapping the example", key="exclude_overlap",
                help="Drops the example's neighbours on the grid and other dates of the same place.")
    spread_column, per_cell_column = st.columns(2)
    spread_column.number_input("Spread cell (km)", min_value=state.SPREAD_KM_RANGE[0],
                               max_value=state.SPREAD_KM_RANGE[1], step=1.0, key="spread_km",
                               help="At most N results per grid cell of this size; 0 turns spreading off.")
    per_cell_column.number_input("Per cell (N)", min_value=state.PER_CELL_RANGE[0],
                                 max_value=state.PER_CELL_RANGE[1], step=1, key="per_cell")
    st.number_input("Query expansion (results)", min_value=state.EXPAND_RANGE[0],
                    max_value=state.EXPAND_RANGE[1], step=1, key="expand",
                    help="Fold the example's nearest results into the query and search again "
                         "(two searches). 5 gained 1-2 points of precision@10 and 2 of mAP on EuroSAT "
                         "and is the default for RCF tables; 0 shows the plain nearest neighbours.")
    st.header("Map")
    st.text_input("Basemap", key="basemap_url", placeholder="none (thumbnails only)",
                  help=f"An XYZ tile URL such as {maps.OSM_TILES}, or a style.json URL. Empty: no basemap. "
                       "Default from $CHIPSCOUT_BASEMAP_URL.")
    st.checkbox("Draw chip thumbnails on the map", key="map_thumbnails")
    where_change.sidebar_toggle()
    link_params = sync_link()
    st.header("Share")
    st.caption("The address bar holds this search; this link reopens it:")
    st.code((st.context.url or "") + "?" + urlencode(link_params), language=None, wrap_lines=True)

settings = state.from_session(st.session_state, table)
st.title("chipscout")
for problem in st.session_state.pop("link_problems", []):
    st.warning(problem)

try:
    engine = search_engine(db_uri, table)
    engine.refresh()  # see chips indexed since the app started (caches follow the new version)
    row_count = engine.count()
    table_version = engine.version  # in every cache key of what the page draws from the table
except ChipscoutError as err:
    st.error(f"Cannot open the chip table: {err}")
    st.stop()
if row_count == 0:
    st.info(f"Table `{table}` is empty: index some imagery first (`chipscout index files ...` or "
            "`chipscout demo`).")
    st.stop()

sensor_note = f" · {SENTINEL_ATTRIBUTION}" if "sentinel" in engine.config.sensor.lower() else ""
st.caption(f"{row_count} chips in `{table}` · encoder {engine.config.encoder_label} · "
           f"sensor {engine.config.sensor}{sensor_note}")
if engine.product is not None:  # published embeddings: name the product and credit it as its licence asks
    st.caption(f"Product: {engine.product.name} · {engine.product.attribution}")
try:
    basemap_url = st.session_state.basemap_url or None
    maps.basemap_style(basemap_url)
except maps.BasemapError as err:
    st.warning(f"Basemap ignored: {state.markdown_text(err)}. Maps show chip thumbnails only.")
    basemap_url = None

query: ChipRecord | None = None
query_error: ChipscoutError | None = None
if settings.chip_id:
    try:
        query = chip_record(db_uri, table, row_count, settings.chip_id)
    except ChipscoutError as err:
        query_error = err

# ----------------------------------------------------------------------------- the labelling session, the example, its look-alikes
@st.fragment(key=PANEL)
def results_panel() -> None:
    """The open session's panel, the example and its look-alikes: a fragment, so a label click, the
    threshold slider or a round reruns and re-sends only this part (and the sidebar's counts)."""
    settings = state.from_session(st.session_state, table)
    labelling.start_fragment(PANEL)
    seed = labelling.open_seed(engine)
    labelling.show_notices()
    if seed is not None:
        try:
            round_filters = state.search_filters(settings)
        except ChipscoutError as err:  # a bad bbox or date range, also reported under Look-alikes
            st.warning(f"Rounds ignore the sidebar filters until they are fixed: {state.markdown_text(err)}")
            round_filters = None
        labelling.panel(seed, engine, query.chip_id if query else None, partial(proposals_grid, db_uri, table, seed),
                        round_filters, fragment=PANEL)
        st.divider()

    # -------------------------------------------------------------------------- the example
    if query_error is not None:
        st.error(f"{query_error}. Pick an example from the gallery below, or check the chip id.")

    if query is None:
        st.info("Pick an example chip from the gallery or the map below, or paste its id in the sidebar, "
                "to see the places that look like it.")
    else:
        st.subheader("Example")
        picture, facts = st.columns([1, 2])
        with picture, st.container(key="example"):
            png = thumbnails(db_uri, table, (query.chip_id,)).get(query.chip_id)
            if png:
                show_picture(png)
            else:
                st.caption("(no thumbnail stored for this chip)")
            if seed is not None:
                labelling.label_buttons(seed, query.chip_id, "example", fragment=PANEL)
        with facts:
            st.markdown(
                f"**`{query.chip_id}`**\n\n"
                f"| | |\n|---|---|\n"  # a Markdown table needs a header row; it stays blank
                f"| date | {chip_date(query)} |\n"
                f"| place (lat, lon) | {query.center_lat:.5f}, {query.center_lon:.5f} |\n"
                f"| sensor | {query.sensor} |\n"
                f"| cloud | {fraction_text(query.cloud_fraction)} |\n"
                f"| nodata | {fraction_text(query.nodata_fraction)} |\n"
                f"| size | {query.size_px} px at {query.gsd_m:g} m ({query.size_px * query.gsd_m / 1000:g} km) |\n"
                f"| source | `{query.source_id}` ({query.crs}, row {query.row_off}, col {query.col_off}) |")

        def show_change_map(results: list, after: ChipRecord) -> None:
            pngs = thumbnails(db_uri, table, (after.chip_id, *(r.chip.chip_id for r in results)))
            show_map(lambda: maps.results_deck(after, results, pngs, basemap_url, st.session_state.map_thumbnails,
                                           image_src=images.src),
                     ("change", after.chip_id, tuple((r.chip.chip_id, r.similarity) for r in results), basemap_url,
                      st.session_state.map_thumbnails),
                     f"change-map-{after.chip_id}", (maps.RESULTS_LAYER,),
                     f"Map of the example and {len(results)} places with a like change")

        where_change.change_panel(db_uri, table, engine, query, partial(thumbnails, db_uri, table), show_change_map)

    # -------------------------------------------------------------------------- its look-alikes
    if query is not None:
        response = None
        try:
            filters = state.search_filters(settings)
            started = time.perf_counter()
            response = look_alikes(db_uri, table, row_count, query.chip_id, settings.k, repr(filters),
                                   settings.spread_km, settings.per_cell, settings.expand, filters)
            page_ms = (time.perf_counter() - started) * 1000
        except ChipscoutError as err:
            st.error(f"Cannot search: {err}")

        if response is not None:
            st.subheader("Look-alikes")
            # `method` says how the engine answered: exact, exact-scan, ann, ann-postfilter, ann-prefilter, sketch (warm, large tables).
            method = getattr(response, "method", "ann" if response.used_index else "exact")
            method = method.removesuffix("+expanded:0")  # nothing was found to fold in: a plain search
            cached = " (cached)" if page_ms < response.elapsed_ms / 2 else ""
            st.caption(f"{len(response.results)} found · search {response.elapsed_ms:.0f} ms{cached}, {method} · "
                       f"table version {response.table_version}")
            if response.expansion:
                st.caption(f"The example's {response.expansion} nearest results were folded into the query "
                           "(query expansion), so similarities are to that expanded query; set Query "
                           "expansion to 0 in the sidebar for the plain nearest neighbours.")
            if not response.results:
                active = state.describe_filters(settings)
                if active:
                    st.warning(f"No chips match this search ({'; '.join(active)}). Loosen a filter in the sidebar.")
                else:
                    st.warning("No other chips in this table to compare with.")
        if response is not None and response.results:
            map_column, scores_column = st.columns([3, 2])
            with scores_column:
                threshold = similarity_threshold([r.similarity for r in response.results])
            shown = [r for r in response.results if threshold is None or r.similarity >= threshold]
            pngs = thumbnails(db_uri, table, (query.chip_id, *(r.chip.chip_id for r in shown)))
            pngs = where_change.with_heatmaps(db_uri, table, engine, query, [r.chip for r in shown], pngs)
            digits = score_digits([r.similarity for r in response.results])
            with scores_column:
                if len(shown) < len(response.results):
                    st.caption(f"{len(response.results) - len(shown)} results below similarity "
                               f"{threshold:.{digits}f} hidden.")
                if shown and not any(pngs.values()):
                    st.info("This table stores no thumbnails (its bands lack red, green or blue), "
                            "so results show as footprints only.")
                st.caption("Map: the example in magenta; look-alikes outlined from purple (least similar shown) "
                           "to yellow (most similar). Click a footprint to search from it.")
                if seed is not None:
                    st.caption(seed.map_legend([r.chip.chip_id for r in shown]))
            if not shown:
                st.warning(f"The similarity threshold hides all {len(response.results)} results; "
                           "lower it to see them.")
            else:
                with map_column:
                    show_map(lambda: maps.results_deck(
                                 query, shown, pngs, basemap_url, st.session_state.map_thumbnails,
                                 context_mosaic=overview_mosaic(db_uri, table, row_count),
                                 labels=seed.label_map if seed is not None else None, image_src=images.src),
                             ("results", query.chip_id, tuple((r.chip.chip_id, r.similarity) for r in shown),
                              labels_of(seed, (r.chip.chip_id for r in shown)), basemap_url,
                              st.session_state.map_thumbnails, bool(st.session_state.get(where_change.TOGGLE))),
                             f"results-map-{query.chip_id}", (maps.RESULTS_LAYER,),
                             f"Map of the example and {len(shown)} look-alikes")
                with scores_column:
                    st.button("Search only within this map's extent", on_click=set_area,
                              args=(extent_text([query, *(r.chip for r in shown)]),),
                              help="Sets the area filter to the box around the example and the results shown. "
                                   "(Streamlit cannot read back the map's current view.)")
                thumbnail_grid("results-grid", [r.chip for r in shown],
                               [f"**#{r.rank}** · {r.similarity:.{digits}f} · {chip_date(r.chip)}" for r in shown],
                               "hop", pngs, seed, {r.chip.chip_id: r.similarity for r in shown}, "single", PANEL)


# ----------------------------------------------------------------------------- pick an(other) example
@st.fragment(key=GALLERY)
def gallery_panel() -> None:
    """The gallery and the map to pick an example from: a fragment, so paging reruns only this part;
    picking a chip reruns the page (`use_as_example`)."""
    labelling.start_fragment(GALLERY)
    seed = labelling.open_seed(engine)
    st.subheader("Pick another example" if query is not None else "Pick an example")
    pages = max(1, -(-row_count // GALLERY_SIZE))
    page = st.session_state.gallery_page % pages
    previous_column, next_column, shuffle_column, page_column = st.columns([1, 1, 1, 3])
    previous_column.button("◀ Previous", on_click=turn_gallery, args=(pages, -1), width="stretch")
    next_column.button("Next ▶", on_click=turn_gallery, args=(pages, 1), width="stretch")
    shuffle_column.button("Shuffle", on_click=shuffle_gallery, width="stretch")
    page_column.caption(f"One chip of each kind (clusters of the vectors), page 1 of {pages}" if page == 0
                        else f"Random sample, page {page + 1} of {pages}")
    gallery = gallery_page(db_uri, table, row_count, st.session_state.gallery_seed, page)
    gallery_pngs = thumbnails(db_uri, table, tuple(c.chip_id for c in gallery))
    thumbnail_grid("gallery", gallery, [chip_date(c) for c in gallery], "pick", gallery_pngs, seed, fragment=GALLERY)

    overview = overview_chips(db_uri, table, row_count)
    sampled = f"a sample of {len(overview)} of {row_count} chips" if len(overview) < row_count else "every chip"
    st.caption(f"Map of {sampled}, the gallery's chips outlined in orange; click a footprint to use it as the example.")
    show_map(lambda: maps.overview_deck(
                 overview, overview_mosaic(db_uri, table, row_count) if st.session_state.map_thumbnails else None,
                 [c.chip_id for c in gallery], basemap_url, image_src=images.src),
             ("overview", tuple(c.chip_id for c in gallery), basemap_url, st.session_state.map_thumbnails),
             f"overview-map-{settings.chip_id}", (maps.CHIPS_LAYER,), f"Map of {sampled} to pick an example from")


with seed_box:
    labelling.sidebar(engine)
results_panel()
st.divider()
gallery_panel()
