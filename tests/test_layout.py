"""The layout the project promises a reader: one concept per file, files that import each other only
downhill (no circle, imports inside functions included: they run, so they count), no underscore name
reached from another file, and files short enough to read (train.py, the algorithm, the shortest of
the long ones)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

MODULES = {p.stem: p for p in sorted(ROOT.glob("*.py"))}
MAX_LINES = 800
MAX_TRAIN_LINES = 650


def project_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, project module, name or None) for every import of a top-level module of the project in
    the file, at any depth: `import train` gives (n, "train", None), `from train import Config` gives
    (n, "train", "Config"), and `T._name` on a module imported as T gives (n, "train", "_name")."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                if top in MODULES:
                    found.append((node.lineno, top, None))
                    aliases[a.asname or top] = top
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            top = node.module.split(".")[0]
            if top in MODULES:
                found.extend((node.lineno, top, a.name) for a in node.names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append((node.lineno, aliases[node.value.id], node.attr))
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (itself left out)."""
    return {m: {dep for _, dep, _ in project_imports(p) if dep != m} for m, p in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "grey"
        stack.append(m)
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == "grey":
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        state[m] = "black"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_circles_and_only_circles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond is downhill
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y2"}, "y2": {"y"}}) == ["y", "y2", "y"]


def test_imports_inside_functions_and_private_attributes_are_seen(tmp_path, monkeypatch):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    from train import Config, _hidden\n    import evaluate as E\n"
                     "    return E._private, E.main, E.__doc__\n")
    assert sorted(project_imports(probe)) == [(4, "train", "Config"), (4, "train", "_hidden"),
                                              (5, "evaluate", None), (6, "evaluate", "_private")]


def test_no_import_circle_among_the_top_level_modules():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
    assert graph["train"] and graph["evaluate"]  # the graph was really read


@pytest.mark.parametrize("path", sorted(MODULES.values()) + sorted((ROOT / "tests").glob("*.py")),
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_underscore_name_is_imported_from_another_file(path):
    private = [f"{path.name}:{line}: {module}.{name}" for line, module, name in project_imports(path)
               if name is not None and name.startswith("_") and not name.startswith("__") and module != path.stem]
    assert not private, "private names used across files: " + "; ".join(private)


def test_files_are_short_enough_to_read():
    lengths = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in MODULES.values()}
    assert lengths["train.py"] <= MAX_TRAIN_LINES, lengths["train.py"]
    long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert not long, long


def test_every_file_opens_with_the_concept_it_holds():
    for name, path in MODULES.items():
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc and len(doc.split("\n")[0]) > 20, f"{name}.py has no opening docstring saying what it holds"


def test_the_readme_layout_lists_every_file_in_downhill_order():
    """README's Layout table names each top-level file once, and each row imports only rows above it."""
    import re

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("## Layout"):].split("\n\n")[2]
    rows = [re.findall(r"`(\w+)\.py`", line) for line in table.splitlines() if line.startswith("| `")]
    listed = [m for row in rows for m in row]
    assert sorted(listed) == sorted(MODULES), set(listed) ^ set(MODULES)
    graph, above = import_graph(), set()
    for row in rows:
        for m in row:
            assert graph[m] <= above, f"{m}.py imports {sorted(graph[m] - above)}, listed below it"
        above |= set(row)
