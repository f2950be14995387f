"""Recipes: a named list of steps, read from YAML/JSON and validated field by field."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError

from slimkit.errors import RecipeError
from slimkit.io.text import read_text
from slimkit.recipes.base import StepConfig
from slimkit.recipes.builtin_steps import config_types


class Recipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field("custom", pattern=r"^[A-Za-z0-9][\w.-]*$")
    description: str = ""
    steps: tuple[SerializeAsAny[StepConfig], ...] = Field(..., min_length=1)

    def summary(self) -> str:
        return " + ".join(step.summary() for step in self.steps)

    def to_dict(self) -> dict:
        data = self.model_dump(mode="json")
        # method first: it says what the step is
        data["steps"] = [{"method": s.pop("method"), **s} for s in data["steps"]]
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _where(loc: tuple, prefix: str) -> str:
    return prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


def _format(exc: ValidationError, prefix: str, origin: str) -> str:
    lines = [f"invalid recipe ({origin}):"]
    for err in exc.errors():
        lines.append(f"  {_where(tuple(err['loc']), prefix)}: {err['msg']}")
    return "\n".join(lines)


def parse_recipe(data: Any, origin: str = "recipe") -> Recipe:
    """Validate a recipe dict. Errors name the field, e.g. `steps[0].sparsity`."""
    if not isinstance(data, dict):
        raise RecipeError(f"invalid recipe ({origin}): expected a mapping with 'steps', got {type(data).__name__}")
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise RecipeError(f"invalid recipe ({origin}):\n  steps: a non-empty list of steps is required")
    known = config_types()
    steps = []
    for i, raw in enumerate(raw_steps):
        if not isinstance(raw, dict) or "method" not in raw:
            raise RecipeError(f"invalid recipe ({origin}):\n  steps[{i}].method: every step needs a 'method'")
        config_type = known.get(raw["method"])
        if config_type is None:
            raise RecipeError(
                f"invalid recipe ({origin}):\n  steps[{i}].method: unknown method '{raw['method']}'; "
                f"known: {', '.join(sorted(known))}"
            )
        try:
            steps.append(config_type.model_validate(raw))
        except ValidationError as exc:
            raise RecipeError(_format(exc, f"steps[{i}]", origin)) from None
    try:
        return Recipe.model_validate({**data, "steps": steps})
    except ValidationError as exc:
        raise RecipeError(_format(exc, "", origin)) from None


def load_recipe_file(path: str | Path) -> Recipe:
    path = Path(path)
    text = read_text(path, RecipeError)
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise RecipeError(f"recipe {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
    if isinstance(data, dict):
        data.setdefault("name", name_from_file(path))
    return parse_recipe(data, origin=str(path))


def name_from_file(path: Path) -> str:
    """A recipe name for a file without `name:`: its stem, with what a name may not hold as '-'
    (`name with space.yaml` -> `name-with-space`)."""
    name = re.sub(r"[^\w.-]+", "-", path.stem).strip("-._")
    return name if re.match(r"^[A-Za-z0-9]", name) else f"recipe-{name}".rstrip("-")
