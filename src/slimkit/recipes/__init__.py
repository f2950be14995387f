"""Recipes: typed step configs, a registry of handlers, built-ins, and `compress()`."""

from slimkit.recipes.apply import CompressionResult, compress
from slimkit.recipes.base import StepConfig
from slimkit.recipes.builtin import builtin_recipes, get_recipe
from slimkit.recipes.registry import LayerRecord, StepContext, config_types, register_step
from slimkit.recipes.schema import Recipe, load_recipe_file, parse_recipe

__all__ = [
    "CompressionResult",
    "LayerRecord",
    "Recipe",
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
