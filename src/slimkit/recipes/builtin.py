"""Built-in recipes, shipped as YAML files in recipes/builtin/."""

from __future__ import annotations

from pathlib import Path

from slimkit.errors import RecipeError
from slimkit.recipes.schema import Recipe, load_recipe_file

BUILTIN_DIR = Path(__file__).parent / "builtin"


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}


def get_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name, or a YAML/JSON recipe file."""
    builtins = builtin_recipes()
    if str(name_or_path) in builtins:
        return load_recipe_file(builtins[str(name_or_path)])
    path = Path(name_or_path)
    if path.is_file():
        return load_recipe_file(path)
    raise RecipeError(
        f"no recipe '{name_or_path}': not a file, and not a built-in ({', '.join(builtins)}). "
        "Run `slimkit recipes` to list the built-ins."
    )
