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


# --- the docs: every link lands, every command names a file that exists ----------------------------------

DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def heading_anchor(title: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    import re
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def test_heading_anchor_follows_github():
    assert heading_anchor("Numerical noise: `python bench_noise.py`") == "numerical-noise-python-bench_noisepy"
    assert heading_anchor("Side by side: `python compare_trl.py`") == "side-by-side-python-compare_trlpy"
    assert heading_anchor("Two updates per batch: `--num-iterations 2`") == "two-updates-per-batch---num-iterations-2"


def markdown_links(text: str) -> list[str]:
    """Targets of [text](target) links, code blocks and inline code left out."""
    import re
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"^(    |\t).*$", "", text, flags=re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def broken_links(doc: Path) -> list[str]:
    """The relative links of a markdown file whose file, or heading anchor, does not exist."""
    bad = []
    for target in markdown_links(doc.read_text(encoding="utf-8")):
        if "://" in target or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            bad.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md":
            titles = [line.lstrip("#") for line in dest.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
            if anchor not in {heading_anchor(t) for t in titles}:
                bad.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    return bad


def commands(doc: Path) -> tuple[set[str], list[str]]:
    """The .py files that `python X.py` / `torchrun ... X.py` commands of a markdown file name, and those
    missing (a ../shared path counts only where ../shared exists: a user's clone has none)."""
    import re
    named = set(re.findall(r"(?:python3?|torchrun)\b[^\n`|]*?\s((?:\.\./)?[\w./-]+\.py)\b",
                           doc.read_text(encoding="utf-8")))
    base = doc.parent if doc.parent != ROOT / "docs" else ROOT  # commands run from the repository root
    missing = [n for n in sorted(named) if not (base / n).exists()
               and not (n.startswith("../shared/") and not (ROOT / "../shared").exists())]
    return named, missing


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(doc):
    bad = broken_links(doc)
    assert not bad, "; ".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_python_command_names_a_file_that_exists(doc):
    named, missing = commands(doc)
    assert named or doc.name != "README.md", "no command found in README.md: the pattern is broken"
    assert not missing, f"{doc.name} names missing files: {missing}"


def test_the_link_and_command_checks_can_fail(tmp_path):
    (tmp_path / "there.md").write_text("# A title: `x`\n")
    doc = tmp_path / "x.md"
    doc.write_text("See [a](missing.md), [b](there.md#a-title-x), [c](there.md#nope), `[d](in-code.md)`\n"
                   "and `python nowhere.py --x`, `python there.md`, `torchrun --nproc 2 gone.py`.\n")
    assert [b.split(":")[0] for b in broken_links(doc)] == ["missing.md", "there.md#nope"]
    assert commands(doc) == ({"nowhere.py", "gone.py"}, ["gone.py", "nowhere.py"])
