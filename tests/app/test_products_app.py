"""A table of published embeddings (an AlphaEarth-layout raster indexed with `--encoder aef`) end to
end: the page names the product and its attribution line and shows PCA thumbnails; picking,
the nodata filter and spreading work; labels, export and warm search through the Python API."""

import json

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

import chipscout
from chipscout.indexer.cli.commands import app as cli
from chipscout.indexer.search import SearchEngine
from tests.app.conftest import APP
from tests.app.test_app import covered_share, mosaic_picture
from tests.indexer.ingest.test_products import write_aef


@pytest.fixture(scope="module")
def product_db(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("aef")
    values = np.random.default_rng(3).integers(-127, 128, size=(64, 64, 64)).astype(np.int8)
    values[:, :10, :10] = -128
    db = str(folder / "db")
    result = CliRunner().invoke(cli, ["index", "files", write_aef(folder / "aef_2024.tif", values), "--encoder", "aef",
                                      "--year", "2024", "--size", "16", "--db", db, "--table", "aef", "--no-progress"])
    assert result.exit_code == 0, result.output
    return db


def test_the_app_opens_a_product_table_with_its_attribution_and_pca_thumbnails(product_db, monkeypatch):
    monkeypatch.setenv("CHIPSCOUT_DB", product_db)
    monkeypatch.delenv("CHIPSCOUT_BASEMAP_URL", raising=False)
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params.update({"table": "aef"})
    at.run()
    assert not at.exception, at.exception
    captions = " | ".join(c.value for c in at.caption)
    assert "AlphaEarth Foundations Satellite Embedding" in captions
    assert "produced by Google and Google DeepMind" in captions
    (overview,) = [json.loads(chart.proto.json) for chart in at.get("deck_gl_json_chart")]
    picture, _ = mosaic_picture(overview)
    assert covered_share(picture) > 0.9  # every chip has its PCA picture

    engine = SearchEngine(product_db, "aef")
    query = engine.chip_at((engine.get_chip("aef_2024_r000032_c000032_s16").center_lon,
                            engine.get_chip("aef_2024_r000032_c000032_s16").center_lat)).chip_id
    at.text_input(key="chip_id").input(query).run()
    assert not at.exception, at.exception
    deck = [json.loads(chart.proto.json) for chart in at.get("deck_gl_json_chart")][0]
    results = next(lay for lay in deck["layers"] if lay["id"] == "results")["data"]
    assert results and query not in [row["chip_id"] for row in results]
    at.slider(key="max_nodata").set_value(0.0).run()
    deck = [json.loads(chart.proto.json) for chart in at.get("deck_gl_json_chart")][0]
    ids = [row["chip_id"] for row in next(lay for lay in deck["layers"] if lay["id"] == "results")["data"]]
    assert ids and all(engine.get_chip(i).nodata_fraction == 0.0 for i in ids)
    assert "aef_2024_r000000_c000000_s16" not in ids  # the chip with the nodata corner


def test_labels_export_spread_and_warm_search_work_on_a_product_table(product_db, tmp_path):
    table = chipscout.connect(product_db).open_table("aef")
    first = table.search(at=(table.chip("aef_2024_r000016_c000016_s16").center_lon,
                             table.chip("aef_2024_r000016_c000016_s16").center_lat), k=5)
    assert len(first) == 5
    session = table.session("ponds")
    table.label(session, ["aef_2024_r000016_c000016_s16", "aef_2024_r000016_c000032_s16"], "positive")
    table.label(session, ["aef_2024_r000048_c000048_s16"], "negative")
    summary = table.export(session, tmp_path / "ponds.geojson")
    exported = json.loads((tmp_path / "ponds.geojson").read_text())
    assert (summary.positives, summary.negatives) == (2, 1) and len(exported["features"]) == 3
    engine = SearchEngine(product_db, "aef")
    cold = [r.chip.chip_id for r in engine.similar_to_chip("aef_2024_r000016_c000016_s16", 6).results]
    engine.warm_up()
    warm = [r.chip.chip_id for r in engine.similar_to_chip("aef_2024_r000016_c000016_s16", 6).results]
    assert warm == cold
    from chipscout.indexer.search import Spread

    spread = engine.similar_to_chip("aef_2024_r000016_c000016_s16", 4, spread=Spread(1.0, 1)).results
    assert len(spread) <= 4
