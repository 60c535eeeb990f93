"""The house's layout, checked from the source: no import cycles, and imports only in the allowed
directions (docs/architecture.md, "Allowed imports", states the same rules in the same words).

Pure standard library (ast): every `.py` under indexer/, encoders/, app/ and chipscout/ is read,
mapped to its installed name (`indexer/search/engine.py` -> `chipscout.indexer.search.engine`,
a package's `__init__.py` -> the package) and every import of it is collected: at module level
and inside functions, `from X import Y` where Y is a submodule, relative imports, and
`importlib.import_module("...")` with a literal name.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- the rules, as data
#: Installed package -> the folder it is installed from (pyproject's package-dir).
ROOTS = {"chipscout": "chipscout", "chipscout.indexer": "indexer", "chipscout.encoders": "encoders",
         "chipscout.app": "app"}
#: The notebook facade: the `chipscout` package and its own private modules (`chipscout._*`).
FACADE = "chipscout (the facade)"
#: Generic top-level names that must never be imported (they are installed under `chipscout.`).
GENERIC_TOP_LEVEL = ("indexer", "encoders", "app")
#: Third-party packages only the store may import.
STORE_ONLY = ("lancedb", "lance")
STORE = "chipscout.indexer.store"


@dataclass(frozen=True)
class Rule:
    text: str
    """The rule as docs/architecture.md states it, word for word."""
    importers: tuple[str, ...]
    """The modules it binds: these names and everything under them (FACADE: the facade)."""
    forbidden: tuple[str, ...] = ()
    """Modules (and everything under them) they must not import."""
    only: tuple[str, ...] | None = None
    within: str | None = None
    """With `only`: of the modules under `within`, the importers may import exactly these ones
    (not their submodules)."""


RULES = [
    Rule("`chipscout.encoders` imports nothing of `chipscout.indexer`, `chipscout.app` or the `chipscout` facade.",
         importers=("chipscout.encoders",),
         forbidden=("chipscout.indexer", "chipscout.app", FACADE)),
    Rule("`chipscout.indexer.sources` imports nothing of `ingest`, `store`, `search`, `seedsets`, "
         "`evaluate` or `cli`.",
         importers=("chipscout.indexer.sources",),
         forbidden=tuple(f"chipscout.indexer.{part}" for part in
                         ("ingest", "store", "search", "seedsets", "evaluate", "cli"))),
    Rule("`chipscout.app` imports of `chipscout.indexer` only the facades `chipscout.indexer.search`, "
         "`chipscout.indexer.seedsets`, `chipscout.indexer.errors`, `chipscout.indexer.paths`, "
         "`chipscout.indexer.geo` and `chipscout.indexer.chips` (never their submodules).",
         importers=("chipscout.app",), within="chipscout.indexer",
         only=tuple(f"chipscout.indexer.{name}" for name in
                    ("search", "seedsets", "errors", "paths", "geo", "chips"))),
]
LANCE_RULE = "Nothing but `chipscout.indexer.store` imports `lancedb` or `lance`."
GENERIC_RULE = "No module imports a top-level `indexer`, `encoders` or `app`."
CYCLE_RULE = "No import cycles, counting imports inside functions."
ALL_RULE_TEXTS = [rule.text for rule in RULES] + [LANCE_RULE, GENERIC_RULE, CYCLE_RULE]


# ----------------------------------------------------------------------------- reading the source
@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    """An absolute module name (ours resolved to the submodule when one is named)."""
    path: str
    line: int
    runtime: bool
    """False under `if TYPE_CHECKING:`: never executed, so it cannot take part in a cycle."""

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def module_files() -> dict[str, Path]:
    """{installed module name: file} of every module of ours."""
    modules = {}
    for package, folder in ROOTS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(tree: ast.AST, runtime: bool = True):
    """(node, runtime) for every node, runtime False under `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for node in child.body:
                yield node, False
                yield from _statements(node, False)
            for node in child.orelse:
                yield node, runtime
                yield from _statements(node, runtime)
            continue
        yield child, runtime
        yield from _statements(child, runtime)


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    shown = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
    found = []
    for node, runtime in _statements(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                names.append(submodule if submodule in known else base)
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        found.extend(Import(module, name, shown, node.lineno, runtime) for name in dict.fromkeys(names))
    return found


def all_imports() -> list[Import]:
    files = module_files()
    known = set(files)
    return [imp for module, path in files.items() for imp in imports_of(module, path, known)]


IMPORTS = all_imports()


# ----------------------------------------------------------------------------- checking
def is_facade(module: str) -> bool:
    return module == "chipscout" or (module.startswith("chipscout.")
                                     and module.split(".")[1] not in ("indexer", "encoders", "app"))


def under(module: str, prefix: str) -> bool:
    if prefix == FACADE:
        return is_facade(module)
    return module == prefix or module.startswith(prefix + ".")


def rule_violations(rule: Rule) -> list[str]:
    found = []
    for imp in IMPORTS:
        if not any(under(imp.importer, p) for p in rule.importers):
            continue
        if any(under(imp.imported, f) for f in rule.forbidden):
            found.append(f"{imp.where()}: {imp.importer} imports {imp.imported}")
        if rule.only is not None and under(imp.imported, rule.within) and imp.imported not in rule.only:
            found.append(f"{imp.where()}: {imp.importer} imports {imp.imported}")
    return found


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle path (first module repeated at the end) per strongly connected component of
    more than one module, or a module importing itself (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root), on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child), on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in edges.get(node, ()):
                        components.append(sorted(component))
    return [_cycle_in(component, edges) for component in sorted(components)]


def _cycle_in(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    members, start = set(component), component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges.get(node, ()) & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle in component {component}")


def report(title: str, lines: list[str]) -> str:
    return f"{title}\n" + "\n".join(f"  {line}" for line in lines)


# ----------------------------------------------------------------------------- the tests
def test_every_module_is_read():
    files = module_files()
    for name in ("chipscout", "chipscout.indexer.search.engine", "chipscout.encoders", "chipscout.app.main"):
        assert name in files
    assert len(IMPORTS) > 100


def test_imports_are_resolved_as_python_resolves_them(tmp_path):
    known = {"chipscout.indexer.seedsets", "chipscout.indexer.seedsets.refine", "chipscout.indexer.errors",
             "chipscout.indexer.seedsets.labels"}
    source = tmp_path / "labels.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import refine\n"
        "from ..errors import LabelError\n"
        "from chipscout.indexer.seedsets import refine as again, Strategy\n"
        "if TYPE_CHECKING:\n    import lancedb\n"
        "def late():\n    import importlib\n    importlib.import_module('chipscout.indexer.errors')\n")
    found = {(i.imported, i.runtime) for i in imports_of("chipscout.indexer.seedsets.labels", source, known)}
    assert found == {("typing", True), ("chipscout.indexer.seedsets.refine", True),
                     ("chipscout.indexer.errors", True), ("chipscout.indexer.seedsets", True),
                     ("lancedb", False), ("importlib", True)}


def test_cycles_are_found_with_their_path():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert find_cycles(edges) == [["a", "b", "c", "a"], ["e", "e"]]


def test_docs_state_the_same_rules():
    architecture = (REPO / "docs" / "architecture.md").read_text()
    missing = [text for text in ALL_RULE_TEXTS if text not in " ".join(architecture.split())]
    if missing:
        pytest.fail(report("docs/architecture.md does not state these rules word for word:", missing),
                    pytrace=False)


def test_no_import_cycles():
    ours = set(module_files())
    edges: dict[str, set[str]] = {}
    for imp in IMPORTS:
        if imp.runtime and imp.imported in ours:
            edges.setdefault(imp.importer, set()).add(imp.imported)
    cycles = find_cycles(edges)
    lines = []
    for cycle in cycles:
        lines.append(" -> ".join(cycle))
        lines += [f"    {imp.where()}: {imp.importer} imports {imp.imported}" for imp in IMPORTS
                  if imp.runtime and (imp.importer, imp.imported) in zip(cycle, cycle[1:])]
    if cycles:
        pytest.fail(report(f"{CYCLE_RULE} Found:", lines), pytrace=False)


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.importers[0])
def test_imports_go_the_allowed_way(rule):
    violations = rule_violations(rule)
    if violations:
        pytest.fail(report(rule.text, violations), pytrace=False)


def test_only_the_store_imports_lancedb_or_lance():
    violations = [f"{imp.where()}: {imp.importer} imports {imp.imported}" for imp in IMPORTS
                  if imp.imported.split(".")[0] in STORE_ONLY and not under(imp.importer, STORE)]
    if violations:
        pytest.fail(report(LANCE_RULE, violations), pytrace=False)


def test_no_generic_top_level_names():
    violations = [f"{imp.where()}: {imp.importer} imports {imp.imported}" for imp in IMPORTS
                  if imp.imported.split(".")[0] in GENERIC_TOP_LEVEL]
    if violations:
        pytest.fail(report(GENERIC_RULE, violations), pytrace=False)
