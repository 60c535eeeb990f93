"""The wheel holds what pyproject promises: everything under `chipscout.*`, no generic top-level
`indexer`, `encoders` or `app`, and every package folder of the source tree (a new subpackage left
out of pyproject's explicit `packages` list would silently be missing from users' installs)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: What a wheel is built from (the rest of the checkout is not part of the distribution).
SOURCES = ("pyproject.toml", "README.md", "chipscout", "indexer", "encoders", "app")
ENTRY_POINTS = "entry_points"  # the fixture's key for the text of the wheel's entry_points.txt


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def package_folders() -> dict[str, Path]:
    """{installed package name: folder} of every folder with an `__init__.py` under the mapped roots."""
    roots = pyproject()["tool"]["setuptools"]["package-dir"]
    found = {}
    for package, folder in roots.items():
        for init in sorted((REPO / folder).rglob("__init__.py")):
            parts = init.parent.relative_to(REPO / folder).parts
            found[".".join([package, *parts])] = init.parent
    return found


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    missing = sorted(set(package_folders()) - listed)
    assert not missing, (f"package folders missing from [tool.setuptools] packages in pyproject.toml "
                         f"(they would not be installed): {', '.join(missing)}")
    stale = sorted(listed - set(package_folders()))
    assert not stale, f"pyproject.toml lists packages with no folder: {', '.join(stale)}"


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> dict[str, str]:
    """The file list of a wheel built (no dependencies, no build isolation) from a clean copy of
    the distribution's sources, so the checkout gets no build/ or egg-info folders."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(out), str(source)], check=True, timeout=120)
    (wheel,) = out.glob("chipscout-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = dict.fromkeys(archive.namelist(), "")
        entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
        names[ENTRY_POINTS] = archive.read(entry_points).decode()
    return names


def test_the_wheel_installs_nothing_but_chipscout(wheel_files):
    top_level = {name.split("/")[0] for name in wheel_files
                 if name != ENTRY_POINTS and not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"chipscout"}
    for generic in ("indexer", "encoders", "app"):
        assert not any(name.startswith(f"{generic}/") for name in wheel_files)


def test_the_wheel_holds_every_package_and_module(wheel_files):
    installed = set(wheel_files)
    missing = []
    for package, folder in package_folders().items():
        target = package.replace(".", "/")
        missing += [f"{target}/{module.name}" for module in sorted(folder.glob("*.py"))
                    if f"{target}/{module.name}" not in installed]
    assert not missing, f"modules missing from the wheel: {', '.join(missing)}"
    assert "chipscout/indexer/search/engine.py" in installed
    assert "chipscout/encoders/registry.py" in installed


def test_the_wheel_declares_the_cli(wheel_files):
    assert "chipscout = chipscout.indexer.cli:main" in wheel_files[ENTRY_POINTS]
