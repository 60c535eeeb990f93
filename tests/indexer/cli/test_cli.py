"""`chipscout` end to end, as a user runs it: real files, real tables, the command's code from
`main` on (in this process, `tests/cli_runner.py`; the table fixture, the app and the start-up
probe run as real processes)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import rasterio

from chipscout.indexer.store import ChipStore
from tests.cli_runner import run_chipscout

TINY = ["--encoder", "rcf", "--kernels", "gaussian", "--features", "64", "--seed", "0"]


def chipscout(*args, check=True, process=False):
    """`chipscout ARGS`: in this process, or with `process=True` as a new Python process."""
    if process:
        result = subprocess.run([sys.executable, "-m", "chipscout.indexer.cli", *map(str, args)],
                                capture_output=True, text=True, timeout=300)
    else:
        result = run_chipscout(*args)
    if check and result.returncode != 0:
        raise AssertionError(f"chipscout {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def cli_db(small_scene_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("cli") / "db"
    result = chipscout("index", "files", small_scene_dir, "--sensor", "sentinel-2-l1c", "--size", "64",
                       *TINY, "--db", db, "--table", "scene", "--json", process=True)
    summary = json.loads(result.stdout)
    assert summary["chips_new"] == 16 and summary["table_rows"] == 16 and summary["failures"] == []
    return db


def _state(db, table="scene"):
    store = ChipStore(str(db), table)
    return store.version, store.count()


def test_search_prints_neighbours_as_json(cli_db):
    query = "S2-small_r000064_c000064_s64"
    result = chipscout("search", query, "-k", "5", "--db", cli_db, "--table", "scene", "--json")
    payload = json.loads(result.stdout)
    ids = [r["chip_id"] for r in payload["results"]]
    assert len(ids) == 5 and query not in ids
    assert payload["results"][0]["similarity"] >= payload["results"][-1]["similarity"]
    text = chipscout("search", query, "-k", "3", "--db", cli_db, "--table", "scene").stdout
    assert "rank" in text and ids[0] in text
    expanded = chipscout("search", query, "-k", "5", "--expand", "4", "--db", cli_db, "--table", "scene",
                         "--json")
    payload = json.loads(expanded.stdout)
    assert payload["expansion"] == 4 and payload["method"].endswith("+expanded:4")
    assert "query expanded with 4 results" in chipscout(
        "search", query, "--expand", "4", "--db", cli_db, "--table", "scene").stdout
    # Without --expand, the table's default: an RCF table with a transform expands by 5.
    default = json.loads(chipscout("search", query, "-k", "5", "--db", cli_db, "--table", "scene",
                                   "--json").stdout)
    plain = json.loads(chipscout("search", query, "-k", "5", "--expand", "0", "--db", cli_db,
                                 "--table", "scene", "--json").stdout)
    assert default["expansion"] == 5 and plain["expansion"] == 0 and "+expanded" not in plain["method"]


def test_search_spreads_results_over_grid_cells_as_the_app_does(cli_db):
    from chipscout.indexer.search import SearchEngine, Spread, grid_cell

    query = "S2-small_r000064_c000064_s64"
    # 16 chips of 640 m in a 2.56 km square: cells of 2 km hold several, and there are few of them.
    args = ["search", query, "-k", "5", "--spread-km", "2", "--per-cell", "1", "--db", cli_db, "--table", "scene"]
    payload = json.loads(chipscout(*args, "--json").stdout)
    cells = [grid_cell(r["center_lon"], r["center_lat"], 2.0) for r in payload["results"]]
    assert 1 <= len(cells) < 5 and len(cells) == len(set(cells))
    assert [r["rank"] for r in payload["results"]] == list(range(1, len(cells) + 1))
    # The same answer as the engine's (and so the app's) spread search.
    expected = SearchEngine(str(cli_db), "scene").similar_to_chip(query, 5, spread=Spread(2.0, 1))
    assert [r["chip_id"] for r in payload["results"]] == [r.chip.chip_id for r in expected.results]
    plain = json.loads(chipscout(*args[:4], "--db", cli_db, "--table", "scene", "--json").stdout)
    assert len(plain["results"]) == 5 and plain["results"][0]["chip_id"] == payload["results"][0]["chip_id"]
    assert "rank" in chipscout(*args).stdout
    bad = chipscout(*args[:4], "--spread-km", "-1", "--db", cli_db, "--table", "scene", check=False)
    assert bad.returncode == 1 and "spread cell size" in bad.stderr and "Traceback" not in bad.stderr


def test_info_reports_encoder_and_bands(cli_db):
    payload = json.loads(chipscout("info", "--db", cli_db, "--table", "scene", "--json").stdout)
    assert payload["rows"] == 16
    assert payload["config"]["encoder_label"] == "rcf-gaussian"
    assert payload["default_expand"] == 5  # an RCF table with a transform
    assert payload["config"]["bands"][:3] == ["blue", "green", "red"]
    only = json.loads(chipscout("info", "--db", cli_db, "--json").stdout)  # its one table
    assert only["table"] == "scene" and only["rows"] == 16
    text = chipscout("info", "--db", cli_db, "--table", "scene").stdout
    spec = payload["config"]["transform"]["spec"]
    assert f"transform {spec}: " in text and "fitted on 16 vectors; raw vectors kept" in text
    assert "search    query expansion 5 by default" in text


def test_reindex_via_cli_is_idempotent(cli_db, small_scene_dir):
    before = _state(cli_db)
    result = chipscout("index", "files", small_scene_dir, "--sensor", "sentinel-2-l1c", "--size", "64",
                       *TINY, "--db", cli_db, "--table", "scene", "--json")
    summary = json.loads(result.stdout)
    assert summary["chips_new"] == 0 and summary["chips_present"] == 16
    assert _state(cli_db) == before


def _no_crs_file(tmp_path):
    path = tmp_path / "nocrs.tif"
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=4, dtype="uint16") as out:
        out.write(np.full((4, 64, 64), 500, dtype=np.uint16))
    return path


@pytest.mark.parametrize("case", ["missing-file", "missing-bands", "chip-too-large", "no-crs",
                                  "bad-date", "other-encoder", "bad-size"])
def test_bad_input_fails_clearly_and_leaves_table_untouched(case, cli_db, small_scene_dir, small_cog, tmp_path):
    before = _state(cli_db)
    base = ["index", "files"]
    common = ["--db", cli_db, "--table", "scene", "--no-progress"]
    args, culprit = {
        "missing-file": ([tmp_path / "absent.tif", *TINY], "absent.tif: no such file"),
        "missing-bands": ([small_cog, "--sensor", "sentinel-2-l1c", "--size", "64", *TINY],
                          "missing band(s) rededge1"),
        "chip-too-large": ([small_scene_dir, "--sensor", "sentinel-2-l1c", "--size", "512", *TINY],
                           "chip size 512 px is larger than"),
        "no-crs": ([_no_crs_file(tmp_path), "--file-bands", "B02,B03,B04,B08", "--bands",
                    "blue,green,red,nir", "--size", "64", *TINY, "--table", "fresh"], "no CRS"),
        "bad-date": ([small_scene_dir, "--date", "2024-13-45", *TINY], "bad --date '2024-13-45'"),
        "other-encoder": ([small_scene_dir, "--sensor", "sentinel-2-l1c", "--size", "64", "--encoder", "rcf",
                           "--features", "128"], "holds vectors of another kind"),
        "bad-size": ([small_scene_dir, "--size", "0", *TINY], "size_px must be a positive integer"),
    }[case]
    result = chipscout(*base, *map(str, common), *map(str, args), check=False)
    assert result.returncode != 0
    assert culprit in result.stderr
    assert "Traceback" not in result.stderr
    assert _state(cli_db) == before
    assert ChipStore(str(cli_db), "scene").table_names() == ["scene"]  # no stray table either


@pytest.mark.parametrize("args, culprit", [
    (["--bbox", "10,50,5,40"], "bbox is inverted"),
    (["--from", "last tuesday"], "bad start date"),
    (["-k", "0"], "k must be within"),
    (["--max-cloud", "7"], "within 0..1"),
    (["--expand", "500"], "query expansion must be within 0..100"),
])
def test_bad_search_parameters_fail_clearly(cli_db, args, culprit):
    result = chipscout("search", "S2-small_r000000_c000000_s64", *args, "--db", cli_db, "--table", "scene",
                       check=False)
    assert result.returncode == 1 and culprit in result.stderr and "Traceback" not in result.stderr


def test_missing_table_fails_clearly(cli_db):
    result = chipscout("search", "x_r000000_c000000_s64", "--db", cli_db, "--table", "nope", check=False)
    assert result.returncode == 1 and "no table 'nope'" in result.stderr


def test_index_files_takes_rcf_bias_and_band_stats(small_scene_dir, tmp_path):
    db = tmp_path / "db"
    result = chipscout("index", "files", small_scene_dir, "--sensor", "sentinel-2-l1c", "--size", "64",
                       *TINY, "--bias", "-0.5", "--band-stats", "--db", db, "--table", "tuned", "--json")
    assert json.loads(result.stdout)["chips_new"] == 16
    config = json.loads(chipscout("info", "--db", db, "--table", "tuned", "--json").stdout)["config"]
    assert config["encoder_label"] == "rcf-gaussian+band-stats"
    assert config["encoder_config"]["bias"] == -0.5 and config["encoder_config"]["band_stats"] is True


@pytest.mark.parametrize("command", [["index", "files"], ["eval"]])
@pytest.mark.parametrize("flag", [["--bias", "-0.5"], ["--band-stats"]])
def test_rcf_options_are_refused_for_other_encoders(command, flag, small_scene_dir, tmp_path):
    where = ["--db", tmp_path / "db"] if command[0] == "index" else []
    result = chipscout(*command, small_scene_dir, "--encoder", "band-stats", *flag, *where, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"encoder band-stats does not take {flag[0]}" in result.stderr


def test_eval_takes_clay_pooling_and_standardises(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("fields", "water"):
        (tmp_path / name).mkdir()
        for i in range(6):  # eval scores P@10: each query needs 10 others
            with rasterio.open(tmp_path / name / f"{i}.tif", "w", driver="GTiff", width=16, height=16,
                               count=4, dtype="uint16", crs="EPSG:32618",
                               transform=rasterio.Affine(10, 0, 400000, 0, -10, 4200000)) as out:
                out.write(rng.integers(100, 3000, size=(4, 16, 16)).astype(np.uint16))
                for band, code in enumerate(("B02", "B03", "B04", "B08"), start=1):
                    out.set_band_description(band, code)
    result = chipscout("eval", tmp_path, "--encoder", "clay-tiny", "--pooling", "mean",
                       "--sensor", "sentinel-2-l2a", "--json")
    report = json.loads(result.stdout)
    assert report["encoder"] == "clay-tiny/mean" and report["overall"]["n_images"] == 12


def test_index_stac_takes_the_same_rcf_options(tmp_path):
    # The encoder options are checked before any request: no server is needed to see the refusal.
    result = chipscout("index", "stac", "--url", "http://127.0.0.1:9", "--collection", "sentinel-2-l2a",
                       "--encoder", "band-stats", "--bias", "-0.5", "--db", tmp_path / "db", check=False)
    assert result.returncode == 1 and "encoder band-stats does not take --bias" in result.stderr
    assert "--band-stats" in chipscout("index", "stac", "--help").stdout


def test_a_bare_database_name_is_a_local_folder_for_every_command(tmp_path):
    # LanceDB sends any URI starting with "db" to its cloud; chipscout means the folder here.
    from tests.synthetic import clustered_table

    for name, args in (("dbc", ["search", "a00", "-k", "2", "--json"]), ("db", ["info"])):
        clustered_table(str(tmp_path / name), "clusters", per_cluster=2)
        result = subprocess.run([sys.executable, "-m", "chipscout.indexer.cli", *args, "--db", name,
                                 "--table", "clusters"], capture_output=True, text=True, timeout=300,
                                cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr and "Cloud" not in result.stderr


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_to_chipscout_app_stops_the_server_and_frees_the_port(signal_name, tmp_path):
    import os
    import signal
    import time

    from chipscout.app.screenshot import free_port, wait_until_serving
    from tests.synthetic import clustered_table

    clustered_table(str(tmp_path / "db"), "clusters", per_cluster=2)
    port = free_port()
    # Its own session, so that whatever it leaves behind can be cleaned up below.
    app = subprocess.Popen([sys.executable, "-m", "chipscout.indexer.cli", "app", "--db", tmp_path / "db",
                            "--table", "clusters", "--port", str(port)], start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_until_serving(f"http://127.0.0.1:{port}", app, 120)
        app.send_signal(getattr(signal, signal_name))
        app.wait(timeout=60)
        deadline = time.monotonic() + 30
        while _port_open(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _port_open(port), "the Streamlit server outlived chipscout app"
    finally:
        try:
            os.killpg(app.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        app.wait(timeout=30)


# Commands that never embed start without torch (and `--help` without any heavy library): run
# one after another in one process, as `chipscout` runs them, checking `sys.modules` after each.
_STARTUP_PROBE = """
import json, sys
from chipscout.indexer.cli import main
seen = []
for args in json.loads(sys.argv[1]):
    sys.argv = ["chipscout", *args]
    try:
        main()
    except SystemExit as done:
        assert not done.code, (args, done.code)
    heavy = ("torch", "chipscout.encoders", "rasterio", "lancedb", "streamlit")
    seen.append([args[0], [name for name in heavy if name in sys.modules]])
print("LOADED " + json.dumps(seen))
"""


def test_commands_that_never_embed_start_without_torch(cli_db, tmp_path):
    query = "S2-small_r000064_c000064_s64"
    where = ["--db", str(cli_db), "--table", "scene"]
    commands = [["--help"], ["search", query, "-k", "3", *where], ["info", *where],
                ["label", "new", "probe", *where], ["label", "add", "probe", query, *where],
                ["label", "sessions", *where],
                ["export", "probe", "--out", str(tmp_path / "seeds.geojson"), *where]]
    result = subprocess.run([sys.executable, "-c", _STARTUP_PROBE, json.dumps(commands)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.rsplit("LOADED ", 1)[1])
    assert loaded[0] == ["--help", []], loaded[0]  # no torch, rasterio, lancedb or streamlit
    assert [name for name, modules in loaded if "torch" in modules or "chipscout.encoders" in modules] == []
    assert all("rasterio" not in modules and "streamlit" not in modules for _, modules in loaded), loaded
    assert (tmp_path / "seeds.geojson").exists()


def test_an_omitted_table_is_the_databases_only_chip_table(tmp_path):
    from typer.testing import CliRunner

    from chipscout.indexer.cli import app
    from chipscout.indexer.errors import ChipscoutError
    from tests.synthetic import clustered_table

    db = str(tmp_path / "db")
    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, [*args, "--db", db])

    missing = run("search", "a00")
    assert isinstance(missing.exception, ChipscoutError) and "no chip tables in" in str(missing.exception)
    clustered_table(db, "demo", per_cluster=2)
    found = run("search", "a00", "-k", "2", "--json")
    assert found.exit_code == 0, found.output
    assert json.loads(found.output)["results"][0]["chip_id"].startswith("a")  # its own cluster
    assert "on table demo" in run("label", "new", "s").output
    assert json.loads(run("label", "sessions", "--json").output)["table"] == "demo"
    clustered_table(db, "other", per_cluster=2)  # two tables now: the user must choose
    for args in (["search", "a00"], ["label", "sessions"], ["export", "s", "--out", str(tmp_path / "x.geojson")],
                 ["optimize"]):
        result = run(*args)
        assert isinstance(result.exception, ChipscoutError), (args, result.output)
        assert "holds 2 chip tables (demo, other); choose one with --table" in str(result.exception)
    assert json.loads(run("info", "--json").output)["tables"] == ["demo", "other"]
