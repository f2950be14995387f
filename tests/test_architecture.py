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
