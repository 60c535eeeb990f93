"""A hostile STAC catalogue (issue #23): asset hrefs on local files and on internal hosts are
refused, each as a failure naming the item, and chipscout sends no request to those hosts."""

import json
import socket

import pytest

from chipscout.indexer.sources import HrefPolicy
from chipscout.indexer.sources.stac import HrefRefused
from chipscout.indexer.store import ChipStore
from tests.cli_runner import run_chipscout
from tests.conftest import LoopbackFileServer
from tests.stac_fixtures import ItemSpec, RustacServer, SceneCut, rustac_executable, write_catalog, write_item_assets

pytestmark = pytest.mark.skipif(rustac_executable() is None, reason="rustac is not installed")

S2 = "sentinel-2-l2a"
WHEN = {"s2:processing_baseline": "03.01", "eo:cloud_cover": 5}
TINY = ["--encoder", "rcf", "--kernels", "gaussian", "--features", "16", "--seed", "0", "--size", "32",
        "--bands", "blue,green,red,nir", "--no-progress", "--json"]


@pytest.fixture
def internal_port():
    """An 'internal service' on loopback: it accepts connections into its backlog; the test then
    checks that none came."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield listener
    listener.close()


def test_hrefs_to_local_files_and_internal_hosts_are_refused(small_scene_dir, tmp_path, internal_port):
    root = tmp_path / "stac"
    cut = SceneCut.read(small_scene_dir, size_px=64, offset_px=32)
    internal = f"http://127.0.0.1:{internal_port.getsockname()[1]}/internal"
    with LoopbackFileServer(root / "files") as files:
        items = [write_item_assets(cut, ItemSpec("good", S2, "2021-07-01T10:00:00Z", properties=WHEN),
                                   root / "files", files.url),
                 write_item_assets(cut, ItemSpec("local", S2, "2021-07-02T10:00:00Z", properties=WHEN),
                                   root / "files", f"file://{root / 'files'}"),
                 write_item_assets(cut, ItemSpec("inside", S2, "2021-07-03T10:00:00Z", properties=WHEN),
                                   root / "files", internal)]
        with RustacServer(write_catalog(root / "catalog", items)) as api:
            result = run_chipscout("index", "stac", "--url", api.url, "--collection", S2,
                                   "--allow-host", files.url.split("//", 1)[1], *TINY, "--db", tmp_path / "db")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    summary = json.loads(result.stdout)
    reasons = {f["source"].rsplit("/", 1)[-1]: f["reason"] for f in summary["failures"]}
    assert set(reasons) == {"local", "inside"}
    assert "scheme 'file'" in reasons["local"] and "--allow-href-scheme file" in reasons["local"]
    assert "internal address" in reasons["inside"] and "--allow-host" in reasons["inside"]
    assert result.stderr.count("failed: ") == 2
    sources = {r["source_id"] for r in ChipStore(str(tmp_path / "db"), "chips").scan(["source_id"]).to_pylist()}
    assert sources == {"good"}
    internal_port.setblocking(False)
    with pytest.raises(BlockingIOError):  # no connection ever reached the internal port
        internal_port.accept()


@pytest.mark.parametrize("href, allowed", [
    ("https://52.92.1.1/a/B02.tif", True),  # a public address: checked, never called
    ("s3://bucket/a/B02.tif", True),
    ("file:///etc/passwd", False),
    ("/etc/passwd", False),
    ("/vsizip//tmp/x.zip/a.tif", False),
    ("HDF5:/tmp/x.h5://band", False),
    ("http://127.0.0.1:9999/internal/a.tif", False),
    ("http://localhost/a.tif", False),
    ("http://169.254.169.254/latest/meta-data", False),
    ("http://10.1.2.3/a.tif", False),
    ("http://[::1]:8080/a.tif", False),
    ("http://127.0.0.1:8000/collections/x/a.tif", True),  # the catalogue's own origin
    ("http://127.0.0.1:7000/a.tif", True),  # allowed by --allow-host
])
def test_href_policy(href, allowed):
    policy = HrefPolicy.build("http://127.0.0.1:8000", hosts=["127.0.0.1:7000"])
    if allowed:
        policy.check(href, "item")
    else:
        with pytest.raises(HrefRefused):
            policy.check(href, "item")


def test_file_hrefs_need_a_local_catalogue_or_the_flag():
    assert "file" in HrefPolicy.build("http://h/", schemes=["file"]).schemes
    assert "file" in HrefPolicy.build("file:///catalogue/catalog.json").schemes
    assert "file" not in HrefPolicy.build("https://h/").schemes
