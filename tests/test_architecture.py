"""The house rules that code review would otherwise have to remember."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_cycles_even_through_deferred_imports():
    sys.path.insert(0, str(ROOT / "tools"))
    from import_cycles import cycles, import_graph

    assert cycles(import_graph(include_deferred=True)) == []


def _package_graph() -> dict[str, set[str]]:
    sys.path.insert(0, str(ROOT / "tools"))
    from import_cycles import import_graph, package_graph

    return package_graph(import_graph(include_deferred=True))


def test_packages_form_a_dag_even_through_deferred_imports():
    from import_cycles import cycles

    assert cycles(_package_graph()) == []


def _design_map() -> dict[str, set[str]]:
    """docs/design.md's module table: each row's package and the slimkit packages it says it imports."""
    rows = {}
    for line in (ROOT / "docs/design.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and "imports" not in cells[2]:
            name = cells[0].strip("`").removesuffix("/").removesuffix(".py")
            rows["slimkit" if name == "__init__" else name] = \
                set() if cells[2] == "nothing" else {c.strip(" `") for c in cells[2].split(",")}
    return rows


def test_the_design_map_says_what_each_package_imports():
    graph = _package_graph()
    assert _design_map() == {package: graph.get(package, set()) for package in _design_map()}
    assert set(_design_map()) == set(graph)


def _functions():
    for path in sorted((ROOT / "src/slimkit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(ROOT / "src/slimkit"), node


def _parameters(node: ast.FunctionDef) -> int:
    names = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
    return len(names) - (1 if names[:1] in (["self"], ["cls"]) else 0)


def test_functions_a_reader_can_hold():
    """At most 60 lines, and at most 7 parameters outside the typer command signatures in cli/."""
    long = [f"{path}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)" for path, f in _functions()
            if f.end_lineno - f.lineno + 1 > 60]
    wide = [f"{path}:{f.lineno} {f.name} ({_parameters(f)} parameters)" for path, f in _functions()
            if path.parts[0] != "cli" and _parameters(f) > 7]
    assert long + wide == []
    assert len((ROOT / "src/slimkit/cli/main.py").read_text().splitlines()) < 300


def test_the_registry_is_a_leaf():
    tree = ast.parse((ROOT / "src/slimkit/recipes/registry.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert {m for m in imported if m.startswith("slimkit")} == {"slimkit.recipes.base"}


def test_ruff_is_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests", "tools", "benchmarks"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_new_method_is_its_config_its_handler_and_one_line(monkeypatch):
    from slimkit.errors import RecipeError
    from slimkit.recipes import builtin_steps, compress, parse_recipe

    with pytest.raises(RecipeError, match="unknown method 'scale_weights'"):
        parse_recipe({"steps": [{"method": "scale_weights"}]})
    monkeypatch.setattr(builtin_steps, "STEP_MODULES", [*builtin_steps.STEP_MODULES, "plugins.toy_method"])
    recipe = parse_recipe({"name": "toy", "steps": [{"method": "scale_weights", "factor": 0.25}]})
    model = tiny_llama()
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    result = compress(model, recipe)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before * 0.25)
    assert result.records["model.layers.0.mlp.up_proj"].methods == ["scaled x0.25"]
