"""The README's Python API example runs as written, against a small real table named `demo` in
the default database (`$CHIPSCOUT_DB`, which every test points at its own folder)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tests.conftest import build_index

README = Path(__file__).resolve().parent.parent / "README.md"


def python_api_example() -> str:
    """The first ```python block of the README's "Python API" section."""
    text = README.read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)
    assert blocks, "README.md's Python API section has no ```python block"
    return blocks[0]


def test_the_python_api_example_runs(small_cog, tmp_path, monkeypatch, capsys):
    summary = build_index(os.environ["CHIPSCOUT_DB"], small_cog, table="demo")
    assert summary.chips_new == 98
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python_api_example(), str(README), "exec"), namespace)  # noqa: S102 (the README's own code)

    printed = capsys.readouterr().out
    assert "['demo']" in printed and "similarity" in printed
    assert len(namespace["results"]) == 8 and len(namespace["footprints"]) == 8
    assert namespace["chip_id"] not in namespace["results"].chip_ids
    exported = json.loads((tmp_path / "look-alikes.geojson").read_text())
    labels = sorted(f["properties"]["label"] for f in exported["features"])
    assert labels == ["negative", "positive", "positive", "positive"]
