"""IndexJob: every indexing option once, validated once; the runners' shared doors."""

import ast
from pathlib import Path

import pytest

from chipscout.indexer.chips import ChipGrid
from chipscout.indexer.errors import ChipscoutError, IndexJobError
from chipscout.indexer.ingest import ClusterOptions, EncoderChoice, IndexJob

INDEXER = Path(__file__).resolve().parents[3] / "indexer"


def test_a_job_holds_every_option_with_the_runners_defaults():
    job = IndexJob(db_uri="db", table_name="chips")
    assert job.encoder == EncoderChoice("rcf", {}) and job.grid == ChipGrid(128, 128)
    assert (job.batch_size, job.commit_every, job.transform, job.read_workers) == (32, 512, "default", 1)
    assert job.cluster == ClusterOptions() and not job.cluster.wanted
    assert ClusterOptions(cluster="local:2").wanted and ClusterOptions(scheduler="tcp://h:1").wanted


@pytest.mark.parametrize("options, message", [
    ({"max_nodata_fraction": 1.5}, "max nodata fraction must be within 0..1, got 1.5"),
    ({"max_cloud_fraction": -0.1}, "max cloud fraction must be within 0..1, got -0.1"),
    ({"batch_size": 0}, "batch size and commit size must be positive"),
    ({"commit_every": -1}, "batch size and commit size must be positive"),
    ({"read_workers": 0}, "read workers must be at least 1, got 0"),
    ({"tile_chips": 0}, "chips per unit must be positive, got 0"),
])
def test_a_bad_option_is_one_clear_error(options, message):
    with pytest.raises(IndexJobError, match=message) as raised:
        IndexJob.from_options(db_uri="db", table_name="chips", **options)
    assert isinstance(raised.value, ChipscoutError)


def test_flat_keywords_fill_the_cluster_options_and_unknown_ones_are_refused():
    job = IndexJob.from_options(db_uri="db", table_name="t", cluster="local:2", tile_chips=64, retries=0,
                                batch_size=8)
    assert job.cluster == ClusterOptions(cluster="local:2", tile_chips=64, retries=0)
    assert job.batch_size == 8 and job.cluster.wanted
    with pytest.raises(TypeError, match="unknown indexing option.*batchsize"):
        IndexJob.from_options(db_uri="db", table_name="t", batchsize=8)


def test_sources_import_nothing_of_ingest_store_search_seedsets_or_cli():
    banned = ("ingest", "store", "search", "seedsets", "cli")
    for path in sorted((INDEXER / "sources").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                parts = name.split(".")
                assert not (parts[:2] == ["chipscout", "indexer"] and len(parts) > 2 and parts[2] in banned), \
                    f"{path.name} imports {name}"


def test_the_cluster_runner_imports_no_private_name_and_no_lance():
    tree = ast.parse((INDEXER / "ingest" / "cluster.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("chipscout"):
            assert not [a.name for a in node.names if a.name.startswith("_") and not a.name.endswith("__")], \
                node.module
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not [m for m in modules if m.split(".")[0] in ("lance", "lancedb")]
