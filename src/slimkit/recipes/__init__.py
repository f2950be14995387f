"""Recipes: typed step configs, a registry of handlers, built-ins, and `compress()`."""

from slimkit.recipes.apply import CompressionResult, compress
from slimkit.recipes.base import StepConfig
from slimkit.recipes.builtin import builtin_recipes, get_recipe
from slimkit.recipes.builtin_steps import config_types
from slimkit.recipes.context import LayerRecord, ModelState, RunResources, StepContext
from slimkit.recipes.registry import register_step
from slimkit.recipes.schema import Recipe, load_recipe_file, parse_recipe

__all__ = [
    "CompressionResult",
    "LayerRecord",
    "ModelState",
    "Recipe",
    "RunResources",
    "StepConfig",
    "StepContext",
    "builtin_recipes",
    "compress",
    "config_types",
    "get_recipe",
    "load_recipe_file",
    "parse_recipe",
    "register_step",
]
