"""chipscout's Streamlit page: pick an example chip, see its look-alikes.

Run with `chipscout app` (or `streamlit run app/main.py -- --db PATH --table NAME`).
A thin layer over `indexer.search`: no LanceDB, SQL or torch here.
"""

from __future__ import annotations

import argparse
import sys

import streamlit as st

from indexer.errors import ChipscoutError
from indexer.paths import default_db_uri
from indexer.search import SearchEngine, SearchFilters

ATTRIBUTION = "Contains modified Copernicus Sentinel data."
GALLERY_SIZE = 12


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--db", default=default_db_uri())
    parser.add_argument("--table", default="chips")
    known, _ = parser.parse_known_args(sys.argv[1:])
    return known


@st.cache_resource(show_spinner=False)
def search_engine(db_uri: str, table: str) -> SearchEngine:
    return SearchEngine(db_uri, table)


@st.cache_data(show_spinner=False, max_entries=2048)
def thumbnails(db_uri: str, table: str, chip_ids: tuple[str, ...]) -> dict[str, bytes | None]:
    return search_engine(db_uri, table).thumbnails(list(chip_ids))


st.set_page_config(page_title="chipscout", layout="wide")
args = _arguments()
db_uri = st.query_params.get("db", args.db)
table = st.query_params.get("table", args.table)
st.title("chipscout")

try:
    engine = search_engine(db_uri, table)
    total = engine.count()
except ChipscoutError as err:
    st.error(f"Cannot open the chip table: {err}")
    st.stop()
if total == 0:
    st.info(f"Table {table!r} is empty: index some imagery first (`chipscout index files ...`).")
    st.stop()

st.caption(f"{total} chips in `{table}` · encoder {engine.config.encoder_label} · {ATTRIBUTION}")

with st.sidebar:
    st.header("Example chip")
    typed_id = st.text_input("Chip id", key="typed_chip_id")
    k = st.slider("Neighbours (k)", 1, 50, 12)
    exclude_overlapping = st.checkbox("Exclude chips overlapping the example", value=True)

if typed_id:
    st.session_state["query_chip_id"] = typed_id.strip()

st.subheader("Gallery")
gallery = engine.sample(GALLERY_SIZE, seed=int(st.session_state.get("gallery_seed", 0)))
gallery_thumbs = thumbnails(db_uri, table, tuple(c.chip_id for c in gallery))
columns = st.columns(6)
for position, chip in enumerate(gallery):
    with columns[position % 6]:
        if gallery_thumbs.get(chip.chip_id):
            st.image(gallery_thumbs[chip.chip_id], use_container_width=True)
        if st.button("Find similar", key=f"pick-{chip.chip_id}"):
            st.session_state["query_chip_id"] = chip.chip_id
if st.button("Shuffle gallery"):
    st.session_state["gallery_seed"] = int(st.session_state.get("gallery_seed", 0)) + 1
    st.rerun()

query_id = st.session_state.get("query_chip_id")
if not query_id:
    st.info("Pick a chip from the gallery or type its id to see its look-alikes.")
    st.stop()

try:
    response = engine.similar_to_chip(query_id, k, SearchFilters(exclude_overlapping=exclude_overlapping))
except ChipscoutError as err:
    st.error(str(err))
    st.stop()

query_chip = engine.get_chip(query_id)
st.subheader("Example")
left, right = st.columns([1, 2])
with left:
    thumb = thumbnails(db_uri, table, (query_id,)).get(query_id)
    if thumb:
        st.image(thumb, use_container_width=True)
with right:
    st.markdown(
        f"**{query_chip.chip_id}**  \n"
        f"date: {query_chip.acquired.date() if query_chip.acquired else 'unknown'} · "
        f"place: {query_chip.center_lat:.4f}, {query_chip.center_lon:.4f} · sensor: {query_chip.sensor} · "
        f"cloud: {'n/a' if query_chip.cloud_fraction is None else f'{query_chip.cloud_fraction:.0%}'}")

st.subheader(f"{len(response.results)} look-alikes ({response.elapsed_ms:.0f} ms)")
if not response.results:
    st.warning("No chips match these filters.")
result_thumbs = thumbnails(db_uri, table, tuple(r.chip.chip_id for r in response.results))
columns = st.columns(6)
for position, result in enumerate(response.results):
    with columns[position % 6]:
        image = result_thumbs.get(result.chip.chip_id)
        if image:
            st.image(image, use_container_width=True)
        st.caption(f"#{result.rank} · {result.similarity:.3f}  \n{result.chip.chip_id}")
