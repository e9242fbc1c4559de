"""The house rules of docs/architecture.md, checked on the code: the import graph of ``sdxl_ui`` (imports inside
functions included) has no circle, no import against the layers, no import of another module's private name, and
every module is placed in a layer; files, classes and functions stay short except where the doc names the exception."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.helpers import ROOT
PACKAGE = ROOT / "sdxl_ui"
DOC = ROOT / "docs" / "architecture.md"
MAX_FILE_LINES, MAX_FUNCTION_LINES, MAX_CLASS_LINES = 600, 80, 250


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(mods: dict[str, Path]) -> list[tuple[str, str, str | None, int]]:
    """(importer, imported module, imported name or None, line) for every import of an sdxl_ui module."""
    found = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(name, a.name, None, node.lineno) for a in node.names if a.name in mods]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")
                    anchor = anchor[: len(anchor) - node.level + (path.name == "__init__.py")]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base
                    if target in mods and target != name:
                        found.append((name, target, None if target.endswith(alias.name) else alias.name,
                                      node.lineno))
    return found


def layer_table(text: str) -> dict[str, int]:
    """``module or prefix.*`` -> layer, from the doc's table (rows ``| n | name | a, b.* |``)."""
    table = {}
    for number, entries in re.findall(r"^\|\s*(\d+)\s*\|[^|]*\|([^|]*)\|\s*$", text, flags=re.M):
        for entry in entries.split(","):
            if entry.strip():
                table[entry.strip()] = int(number)
    return table


def layer_of(module: str, table: dict[str, int]) -> int | None:
    if module in table:
        return table[module]
    parts = module.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut]) + ".*"
        if prefix in table:
            return table[prefix]
    return None


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def violations(mods: dict[str, Path], doc_text: str, root: Path = ROOT) -> list[str]:
    """Every broken house rule, each naming the import (file:line) that breaks it."""
    table, found, problems = layer_table(doc_text), imports(mods), []
    for module in mods:
        if layer_of(module, table) is None:
            problems.append(f"{module} is in no layer of docs/architecture.md")
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for importer, target, name, line in found:
        edges[importer].add(target)
        where = f"{mods[importer].relative_to(root)}:{line}"
        low, high = layer_of(importer, table), layer_of(target, table)
        if low is not None and high is not None and high > low:
            problems.append(f"{where}: {importer} (layer {low}) imports {target} (layer {high}): against the layers")
        if name and name.startswith("_") and not name.startswith("__"):
            problems.append(f"{where}: {importer} imports the private name {target}.{name}")
    problems += [f"import circle: {' -> '.join(c)}" for c in circles(edges)]
    return problems


def exceptions(doc_text: str) -> set[str]:
    """The places the doc names as exceptions to the size rules (`path` or `path:function` in its table)."""
    section = doc_text.split("## Named exceptions", 1)[-1]
    return set(re.findall(r"^\|\s*`([^`]+)`", section, flags=re.M))


def oversized(mods: dict[str, Path], doc_text: str) -> list[str]:
    named, out = exceptions(doc_text), []
    for path in mods.values():
        rel = str(path.relative_to(ROOT))
        lines = path.read_text().splitlines()
        if len(lines) > MAX_FILE_LINES and rel not in named:
            out.append(f"{rel}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            length = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            limit = MAX_FUNCTION_LINES if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else \
                MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else None
            if limit is not None and length > limit and f"{rel}:{node.name}" not in named:
                out.append(f"{rel}:{node.name}: {length} lines")
    return out


def test_imports_run_one_way_without_circles_or_private_names():
    problems = violations(modules(), DOC.read_text())
    assert not problems, "\n".join(problems)


def test_no_long_files_or_functions_outside_the_named_exceptions():
    problems = oversized(modules(), DOC.read_text())
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- the checker itself catches what it must

def _tree(tmp_path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        path = tmp_path / "sdxl_ui" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return modules(tmp_path / "sdxl_ui")


DOC_SAMPLE = "| 0 | ground | sdxl_ui.schema |\n| 2 | planning | sdxl_ui.policy, sdxl_ui.units.* |\n" \
             "| 4 | service | sdxl_ui.service, sdxl_ui |\n"


@pytest.mark.parametrize("files, expected", [
    ({"__init__.py": "", "schema.py": "from .policy import make_plan\n", "policy.py": "x = 1\n",
      "service.py": ""}, "sdxl_ui.schema (layer 0) imports sdxl_ui.policy (layer 2): against the layers"),
    ({"__init__.py": "", "schema.py": "", "policy.py": "def f():\n    from . import service\n",
      "service.py": "from .policy import f\n"}, "sdxl_ui.policy (layer 2) imports sdxl_ui.service (layer 4)"),
    ({"__init__.py": "", "schema.py": "", "policy.py": "from .schema import _secret\n", "service.py": ""},
     "imports the private name sdxl_ui.schema._secret"),
    ({"__init__.py": "", "schema.py": "", "policy.py": "", "service.py": "", "units/__init__.py": "",
      "units/a.py": "from .b import x\n", "units/b.py": "from .a import y\n"},
     "import circle: sdxl_ui.units.a -> sdxl_ui.units.b"),
    ({"__init__.py": "", "schema.py": "", "policy.py": "", "service.py": "", "stray.py": ""},
     "sdxl_ui.stray is in no layer"),
])
def test_the_check_names_each_kind_of_offence(tmp_path, files, expected):
    problems = violations(_tree(tmp_path, files), DOC_SAMPLE, root=tmp_path)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("added, expected", [
    # circle 3 of issue 20: a unit importing the planner that runs it
    ("from ..policy import make_plan", "import circle: sdxl_ui.optimizations.fitting -> "),
    ("from ..service import GenerationService",
     "optimizations/fitting.py:{line}: sdxl_ui.optimizations.fitting (layer 2) imports sdxl_ui.service (layer 4)"),
])
def test_putting_a_real_import_back_fails_and_names_it(tmp_path, added, expected):
    """The check on a copy of the real package with one import put back, hidden inside a function."""
    import shutil

    shutil.copytree(PACKAGE, tmp_path / "sdxl_ui", ignore=shutil.ignore_patterns("__pycache__"))
    unit = tmp_path / "sdxl_ui" / "optimizations" / "fitting.py"
    text = unit.read_text() + f"\n\ndef back_up():\n    {added}\n"
    unit.write_text(text)
    line = len(text.splitlines())
    problems = violations(modules(tmp_path / "sdxl_ui"), DOC.read_text(), root=tmp_path)
    assert any(expected.format(line=line) in p for p in problems), problems


def test_the_foundation_imports_no_torch_diffusers_or_gradio():
    """Layer 0 is plain data and rules: no module of it imports torch, diffusers or gradio, not even in a function."""
    table, heavy = layer_table(DOC.read_text()), ("torch", "diffusers", "gradio", "transformers")
    found = []
    for name, path in modules().items():
        if layer_of(name, table) != 0:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            found += [f"{name}: {n}" for n in names if n.split(".")[0] in heavy]
    assert not found, found
