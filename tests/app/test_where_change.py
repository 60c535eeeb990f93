"""The page's heatmap toggle and its search-by-change mode (issue #20), driven by AppTest."""

import json

from streamlit.testing.v1 import AppTest

from tests.app.conftest import APP
from tests.app.test_app import QUERY, decks, layer, result_captions
from tests.indexer.search.test_change import PONDS, _id, build_change_table


def test_heatmap_toggle_draws_over_thumbnails_and_footprints(open_app):
    at = open_app()
    at.text_input(key="chip_id").input(QUERY).run()
    plain = {img.proto.imgs[0].url for img in at.get("image")}
    results_deck = next(d for d in decks(at) if layer(d, "results"))
    plain_layers = json.dumps(results_deck["layers"])
    at.checkbox(key="show_heatmaps").check().run()
    assert not at.exception, at.exception
    assert any("Heatmaps: each result's cells" in c.value for c in at.caption)
    assert len(result_captions(at)) == 12  # the results stay as they were
    heat = {img.proto.imgs[0].url for img in at.get("image")}
    assert heat != plain  # the result thumbnails now carry the overlay
    heat_deck = next(d for d in decks(at) if layer(d, "results"))
    assert json.dumps(heat_deck["layers"]) != plain_layers  # and so do their footprints on the map


def test_change_mode_shows_before_and_after_side_by_side(small_cog, tmp_path, monkeypatch):
    build_change_table(small_cog, tmp_path, table="changed")
    monkeypatch.setenv("CHIPSCOUT_DB", str(tmp_path / "db"))
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params.update({"table": "changed"})
    at.run()
    at.text_input(key="chip_id").input(_id("june", *PONDS[0])).run()
    assert not at.exception, at.exception
    # The shifted October grid has no chip over this eastern place: two dates to pick from.
    assert at.selectbox(key="change_before").options == ["2024-06-15", "2024-09-20"]
    at.selectbox(key="change_after").select("2024-09-20")
    at.number_input(key="change_k").set_value(2)
    at.toggle(key="change_on").set_value(True).run()
    assert not at.exception, at.exception
    captions = [c.value for c in at.caption]
    assert any("places whose change 2024-06-15 -> 2024-09-20" in c for c in captions)
    ranked = [c for c in captions if c.startswith("**#") and "`" in c]
    assert sorted(c.split("`")[1] for c in ranked) == sorted(_id("sept", *rc) for rc in PONDS[1:])
    change_deck = [d for d in decks(at) if layer(d, "results") and
                   {r["chip_id"] for r in layer(d, "results")["data"]} == {_id("sept", *rc) for rc in PONDS[1:]}]
    assert change_deck


def test_change_mode_says_when_a_place_has_one_date(open_app, app_db):
    at = open_app()
    at.text_input(key="chip_id").input(QUERY).run()
    # The app table holds the place at two dates with the same pixels: the change is refused in a line.
    at.toggle(key="change_on").set_value(True).run()
    assert not at.exception, at.exception
    assert any("did not change" in e.value for e in at.error)
