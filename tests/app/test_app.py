"""The Streamlit page driven by Streamlit's AppTest over a small real index: every way to pick an
example, the filters, spreading, the threshold, the shareable link, and the empty and broken states.

The database comes from $CHIPSCOUT_DB (the page's default for --db) and the table from the URL.
"""

import base64
import io
import json
from datetime import date

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from chipscout.indexer.search import SearchFilters
from chipscout.indexer.search import grid_cell

QUERY = "cut-june_r000064_c000064_s64"
TWIN = "cut-sept_r000064_c000064_s64"  # the same place on the other date


def decks(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.json) for chart in at.get("deck_gl_json_chart")]


def layer(deck: dict, layer_id: str) -> dict | None:
    return next((lay for lay in deck["layers"] if lay["id"] == layer_id), None)


def results_map(at: AppTest) -> dict:
    (deck,) = [d for d in decks(at) if layer(d, "results")]
    return deck


def result_ids(at: AppTest) -> list[str]:
    return [row["chip_id"] for row in layer(results_map(at), "results")["data"]]


def result_captions(at: AppTest) -> list[str]:
    return [c.value for c in at.caption if c.value.startswith("**#")]


def texts(elements) -> str:
    return " | ".join(str(e.value) for e in elements)


def mosaic_picture(deck: dict) -> tuple[Image.Image, list[float]]:
    """The mosaic layer's picture (a data URI under AppTest) and its lon/lat bounds."""
    mosaic = layer(deck, "mosaic")
    assert mosaic["@@type"] == "BitmapLayer"
    data = mosaic["image"].strip("'").removeprefix("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data))), mosaic["bounds"]


def covered_share(picture: Image.Image) -> float:
    """The share of the picture's pixels a thumbnail was drawn on (the rest is transparent)."""
    alpha = picture.getchannel("A")
    return sum(alpha.histogram()[1:]) / (picture.width * picture.height)


def click_map(at: AppTest, chart_index: int, layer_id: str, chip_id: str) -> AppTest:
    """What a click on a footprint sends: the chart's selection state. AppTest has no pydeck widget,
    so the state is added to the other widgets' states by hand (uses AppTest internals)."""
    chart = at.get("deck_gl_json_chart")[chart_index]
    states = at._tree.get_widget_states()
    clicked = states.widgets.add()
    clicked.id = chart.proto.id
    clicked.string_value = json.dumps(
        {"selection": {"indices": {layer_id: [0]}, "objects": {layer_id: [{"chip_id": chip_id}]}}})
    at._run(states)
    assert not at.exception, at.exception
    return at


# ----------------------------------------------------------------------------- picking an example
def test_start_page_offers_a_gallery_and_a_clickable_map(open_app):
    at = open_app()
    assert "Pick an example chip" in texts(at.info)
    assert len([b for b in at.button if b.key and b.key.startswith("pick-")]) == 12
    (overview,) = decks(at)
    assert len(layer(overview, "chips")["data"]) == 98 and layer(overview, "chips")["pickable"]
    # The chips' thumbnails as one picture over their extent (one image, fetched once by URL when served).
    picture, bounds = mosaic_picture(overview)
    footprints = [row["polygon"] for row in layer(overview, "chips")["data"]]
    assert bounds == pytest.approx([min(p[0] for f in footprints for p in f), min(p[1] for f in footprints for p in f),
                                    max(p[0] for f in footprints for p in f), max(p[1] for f in footprints for p in f)],
                                   abs=1e-6)
    assert covered_share(picture) > 0.9 and 48 <= picture.width <= 1000  # about 24 px a chip
    assert overview["mapStyle"] == "__MAP_STYLE__"  # no basemap by default: nothing fetched from the net
    assert "Contains modified Copernicus Sentinel data." in texts(at.caption)
    assert dict(at.query_params) == {"table": "chips"}


def test_pick_from_the_gallery_shows_the_example_and_its_look_alikes(open_app):
    at = open_app()
    pick = next(b for b in at.button if b.key and b.key.startswith("pick-"))
    chip_id = pick.key.removeprefix("pick-")
    pick.click().run()
    assert not at.exception
    assert at.text_input(key="chip_id").value == chip_id and at.query_params["chip"] == chip_id
    assert "Example" in [h.value for h in at.subheader]
    assert len(result_captions(at)) == 12
    assert any("search" in c.value and " ms" in c.value for c in at.caption)
    deck = results_map(at)
    assert len(layer(deck, "results")["data"]) == 12
    assert [row["chip_id"] for row in layer(deck, "query")["data"]] == [chip_id]
    bitmaps = [lay for lay in deck["layers"] if lay["@@type"] == "BitmapLayer" and lay["id"] != "mosaic"]
    assert len(bitmaps) == 13 and all(lay["image"].startswith("data:image/png;base64,") for lay in bitmaps)
    assert mosaic_picture(deck)[1] == mosaic_picture(decks(at)[1])[1]  # one mosaic, under both maps
    assert all(len(lay["bounds"]) == 4 for lay in bitmaps)
    assert len(decks(at)) == 2  # the pick-another map stays below


def test_pick_by_id_and_exclude_overlap_by_default(open_app, engine):
    at = open_app()
    at.text_input(key="chip_id").input(QUERY).run()
    ids = result_ids(at)
    assert len(ids) == 12 and QUERY not in ids and TWIN not in ids
    query = engine.get_chip(QUERY)
    for chip_id in ids:
        assert engine.get_chip(chip_id).footprint.intersection(query.footprint).area < 1e-6 * query.footprint.area


def test_pick_by_clicking_a_footprint_on_the_map(open_app):
    at = open_app()
    click_map(at, 0, "chips", TWIN)
    assert at.text_input(key="chip_id").value == TWIN and at.query_params["chip"] == TWIN
    assert len(result_ids(at)) == 12
    # Tooltips: the chip id on its own line of an HTML template (no literal "<br/>" in a row's
    # text), wrapping inside the map rather than running off its edge.
    for chart in at.get("deck_gl_json_chart"):
        tooltip = json.loads(chart.proto.tooltip)
        assert tooltip["html"] == "{label}<br/>{chip_id}" and tooltip["style"]["overflowWrap"] == "anywhere"
    assert not [row for row in layer(results_map(at), "results")["data"] if "<" in row["label"]]
    # A click on a result hops to it.
    hop = result_ids(at)[3]
    click_map(at, 0, "results", hop)
    assert at.text_input(key="chip_id").value == hop and hop not in result_ids(at)


def test_gallery_pages_and_shuffles(open_app):
    at = open_app()

    def gallery():
        return [b.key for b in at.button if b.key and b.key.startswith("pick-")]

    first = gallery()
    assert any("One chip of each kind" in c.value for c in at.caption)  # page 1: a diverse sample
    next(b for b in at.button if b.label == "Next ▶").click().run()
    second = gallery()
    assert len(second) == 12 and set(first) != set(second)
    assert any("page 2 of 9" in c.value for c in at.caption)
    next(b for b in at.button if b.label == "Shuffle").click().run()
    assert gallery() != second and any("page 1 of 9" in c.value for c in at.caption)


# ----------------------------------------------------------------------------- filters
def test_date_area_and_nodata_filters(open_app, engine):
    at = open_app(chip=QUERY)
    unfiltered = result_ids(at)
    at.date_input(key="date_from").set_value(date(2024, 7, 1)).run()
    assert result_ids(at) and all(i.startswith("cut-sept") for i in result_ids(at))
    assert at.query_params["from"] == "2024-07-01"

    # The half of the cut east of the example's centre.
    query = engine.get_chip(QUERY)
    box = (query.center_lon, query.center_lat - 0.1, query.center_lon + 0.1, query.center_lat + 0.1)

    def meets_box(chip_id):
        lo_lon, lo_lat, hi_lon, hi_lat = engine.get_chip(chip_id).footprint.bounds
        return hi_lon >= box[0] and lo_lon <= box[2] and hi_lat >= box[1] and lo_lat <= box[3]

    assert any(not meets_box(i) for i in unfiltered)  # so the box has something to exclude
    at.date_input(key="date_from").set_value(None)
    at.text_input(key="bbox").input(",".join(f"{v:.6f}" for v in box)).run()
    ids = result_ids(at)
    assert ids and all(meets_box(i) for i in ids)
    assert not {i for i in unfiltered if not meets_box(i)} & set(ids)

    at.text_input(key="bbox").input("").run()
    at.slider(key="max_nodata").set_value(0.0).run()
    assert all(engine.get_chip(i).nodata_fraction == 0.0 for i in result_ids(at))
    at.slider(key="max_cloud").set_value(0.1).run()  # no cloud mask: unknown cloud always passes
    assert len(result_ids(at)) == 12 and at.query_params["cloud"] == "0.1"


def test_unchecking_exclude_overlap_brings_back_the_same_place(open_app):
    at = open_app(chip=QUERY)
    at.checkbox(key="exclude_overlap").uncheck().run()
    assert result_ids(at)[0] == TWIN and at.query_params["overlap"] == "0"


def test_spread_keeps_one_result_per_cell(open_app, engine):
    at = open_app(chip=QUERY, k="5")
    at.number_input(key="spread_km").set_value(1.0).run()
    ids = result_ids(at)
    cells = {grid_cell(c.center_lon, c.center_lat, 1.0) for c in map(engine.get_chip, ids)}
    assert len(ids) == 5 and len(cells) == 5
    at.number_input(key="per_cell").set_value(2).run()
    cells = [grid_cell(c.center_lon, c.center_lat, 1.0) for c in map(engine.get_chip, result_ids(at))]
    assert max(cells.count(c) for c in cells) <= 2 and at.query_params["per_cell"] == "2"


def test_query_expansion_reranks_with_the_api_and_goes_into_the_link(open_app, engine):
    at = open_app(chip=QUERY, k="5")
    # The table's default expansion (an RCF table with a transform: 5), left out of the link.
    assert engine.default_expand == 5 and at.number_input(key="expand").value == 5
    assert "expand" not in at.query_params
    default = engine.similar_to_chip(QUERY, 5, SearchFilters(exclude_overlapping=True))
    assert default.expansion == 5 and result_ids(at) == [r.chip.chip_id for r in default.results]
    assert any("5 nearest results were folded into the query" in c.value for c in at.caption)
    at.number_input(key="expand").set_value(0).run()
    plain = engine.similar_to_chip(QUERY, 5, SearchFilters(exclude_overlapping=True), expand=0)
    assert result_ids(at) == [r.chip.chip_id for r in plain.results] and at.query_params["expand"] == "0"
    assert not any("folded into the query" in c.value for c in at.caption)
    plain_captions = result_captions(at)
    assert open_app(chip=QUERY, k="5", expand="0").number_input(key="expand").value == 0
    at.number_input(key="expand").set_value(3).run()
    assert result_captions(at) != plain_captions  # scores against the expanded query
    expected = engine.similar_to_chip(QUERY, 5, SearchFilters(exclude_overlapping=True), expand=3)
    assert expected.expansion == 3
    assert result_ids(at) == [r.chip.chip_id for r in expected.results]
    assert at.query_params["expand"] == "3"
    assert any("expanded:3" in c.value for c in at.caption)


def test_threshold_hides_results_below_it(open_app):
    at = open_app(chip=QUERY)
    (threshold,) = [s for s in at.slider if s.label == "Hide results below similarity"]
    scores = sorted(float(c.split(" · ")[1]) for c in result_captions(at))
    cut = scores[len(scores) // 2]
    threshold.set_value(cut).run()
    shown = [float(c.split(" · ")[1]) for c in result_captions(at)]
    assert 0 < len(shown) < 12 and all(s >= cut - 1e-4 for s in shown)
    assert len(result_ids(at)) == len(shown)
    assert float(at.query_params["min_sim"]) == pytest.approx(cut, abs=1e-4)
    assert any("hidden" in c.value for c in at.caption)


# ----------------------------------------------------------------------------- the shareable link
def test_the_link_reproduces_the_search(open_app):
    at = open_app(chip=QUERY)
    at.slider(key="k").set_value(7)
    at.checkbox(key="exclude_overlap").uncheck()
    at.date_input(key="date_to").set_value(date(2024, 12, 31))
    at.number_input(key="spread_km").set_value(0.5)
    at.number_input(key="per_cell").set_value(2)
    at.run()
    link = dict(at.query_params)
    assert link == {"table": "chips", "chip": QUERY, "k": "7", "to": "2024-12-31", "overlap": "0",
                    "spread_km": "0.5", "per_cell": "2"}
    reopened = open_app(**{key: value for key, value in link.items() if key != "table"})
    assert result_ids(reopened) == result_ids(at) and len(result_ids(at)) == 7
    assert result_captions(reopened) == result_captions(at)
    for key in ("k", "spread_km", "per_cell"):
        widget = reopened.slider(key=key) if key == "k" else reopened.number_input(key=key)
        assert widget.value == (at.slider(key=key) if key == "k" else at.number_input(key=key)).value
    assert reopened.checkbox(key="exclude_overlap").value is False
    assert reopened.date_input(key="date_to").value == date(2024, 12, 31)
    assert dict(reopened.query_params) == link


# ----------------------------------------------------------------------------- empty and broken states
def test_a_missing_table_says_which_tables_exist(open_app):
    at = open_app(table="nope")
    assert "no table 'nope'" in texts(at.error) and "chips" in texts(at.error)


def test_an_empty_table_says_how_to_fill_it(open_app):
    at = open_app(table="empty")
    assert "is empty" in texts(at.info) and "chipscout index" in texts(at.info)


def test_a_table_without_thumbnails_still_maps_footprints(open_app):
    at = open_app(table="plain", chip="cut-june_r000000_c000000_s128")
    assert "stores no thumbnails" in texts(at.info)
    deck = results_map(at)
    assert layer(deck, "results")["data"] and not [lay for lay in deck["layers"] if lay["@@type"] == "BitmapLayer"]
    assert layer(deck, "mosaic") is None
    assert "(no thumbnail" in texts(at.caption)


def test_a_filter_that_excludes_everything_says_which_filters_are_on(open_app):
    at = open_app(chip=QUERY, bbox="10,10,11,11")
    assert "No chips match this search" in texts(at.warning) and "area 10,10,11,11" in texts(at.warning)
    assert not [d for d in decks(at) if layer(d, "results")]


def test_a_threshold_above_every_score_says_so(open_app):
    at = open_app(chip=QUERY, min_sim="1")
    assert "hides all 12 results" in texts(at.warning)


def test_a_missing_chip_in_the_link_is_an_error_with_the_gallery_still_there(open_app):
    at = open_app(chip="cut-june_r999999_c000000_s64")
    assert "no chip 'cut-june_r999999_c000000_s64'" in texts(at.error)
    assert len([b for b in at.button if b.key and b.key.startswith("pick-")]) == 12


def test_malformed_link_values_are_ignored_with_a_warning(open_app):
    at = open_app(chip="bad id!", k="0", cloud="lots")
    warnings = texts(at.warning)
    assert "ignored `chip=bad id!`" in warnings and "ignored `k=0`" in warnings and "ignored `cloud=lots`" in warnings
    assert at.slider(key="k").value == 12 and at.text_input(key="chip_id").value == ""


def test_a_basemap_url_becomes_a_raster_style_and_a_bad_one_is_ignored(open_app, monkeypatch):
    monkeypatch.setenv("CHIPSCOUT_BASEMAP_URL", "https://tiles.example/{z}/{x}/{y}.png")
    at = open_app()
    assert decks(at)[0]["mapStyle"].startswith("data:application/json;base64,")
    at.text_input(key="basemap_url").input("tiles.example/{z}").run()
    assert "Basemap ignored" in texts(at.warning) and decks(at)[0]["mapStyle"] == "__MAP_STYLE__"


def test_link_dates_outside_the_date_widgets_range_are_ignored_and_the_page_keeps_working(open_app):
    at = open_app(to="0001-01-01", **{"from": "9999-12-31"})
    warnings = texts(at.warning)
    assert "ignored `to=0001-01-01`" in warnings and "ignored `from=9999-12-31`" in warnings
    assert at.date_input(key="date_from").value is None and at.date_input(key="date_to").value is None
    at.slider(key="k").set_value(6).run()
    assert not at.exception and at.slider(key="k").value == 6


def test_a_rejected_link_value_is_shown_literally_not_as_markdown(open_app):
    at = open_app(chip="x`[link](http://evil.example) ![i](http://evil.example/i.png)`y")
    assert "ignored ``chip=x`[link](http://evil.example) ![i](http://evil.example/i.png)`y``" in texts(at.warning)
