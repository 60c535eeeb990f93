"""`chipscout search --where / --rank-by-cell / --cell` as a user runs it (issue #20)."""

import json

import rasterio
from typer.testing import CliRunner

from chipscout.indexer.chips import ChipGrid
from chipscout.indexer.cli.commands import app
from chipscout.indexer.errors import QueryError
from tests.conftest import build_index


def chipscout(*args, check=True):
    """In-process (a subprocess per call costs seconds of imports); test_cli.py runs real processes."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if check and result.exit_code != 0:
        raise AssertionError(f"chipscout {' '.join(map(str, args))} failed: {result.exception!r}")
    return result


def test_search_writes_heatmaps_and_ranks_by_cell(small_cog, tmp_path):
    db = tmp_path / "db"
    build_index(db, small_cog, grid=ChipGrid(64, 64))
    query = "cut-june_r000064_c000064_s64"
    out = tmp_path / "where"
    result = chipscout("search", query, "-k", "3", "--where", out, "--rank-by-cell", "--cell", "2,3",
                       "--pool", "20", "--db", db, "--json")
    payload = json.loads(result.stdout)
    assert payload["ranked_by"] == "cell" and len(payload["results"]) == 3
    best = [r["heatmap"]["similarity"][r["heatmap"]["best_cell"][0]][r["heatmap"]["best_cell"][1]]
            for r in payload["results"]]
    assert best == sorted(best, reverse=True)
    # The September copy of the query chip holds the query cell itself: it comes first.
    assert payload["results"][0]["chip_id"] == "cut-sept_r000064_c000064_s64"
    assert payload["results"][0]["heatmap"]["best_cell"] == [2, 3]
    tifs = sorted(out.glob("*.tif"))
    assert len(tifs) == 3 and len(sorted(out.glob("*.png"))) == 3
    with rasterio.open(tifs[0]) as tif:
        assert tif.count == 1 and tif.shape == (8, 8) and tif.crs is not None
    text = chipscout("search", query, "-k", "2", "--where", out, "--where-format", "png", "--db", db).stdout
    assert "ranked by whole chip" in text and "wrote 2 file(s)" in text
    bad = chipscout("search", query, "--cell", "2;3", "--db", db, check=False)
    # main() turns a QueryError into one red line (test_cli.py checks that path for every command)
    assert isinstance(bad.exception, QueryError) and "--cell must be ROW,COL" in str(bad.exception)
    assert "\n" not in str(bad.exception)
