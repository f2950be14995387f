"""Built-in recipes with their training budgets cut: the code paths run, the budget is not the point
(fingerprints of a refactor, file sizes). Distill steps are cut to `distill_steps`; AutoRound's,
scale tuning's and block reconstruction's to `learned_steps`."""

from __future__ import annotations

from slimkit.recipes import Recipe, get_recipe


def cut_step(step, distill_steps: int, learned_steps: int):
    """A step with its training budget cut (the same step when it trains nothing)."""
    if step.method == "distill":
        return step.model_copy(update={"steps": distill_steps, "checkpoint_every": distill_steps})
    update = {key: budget.model_copy(update={"iters": learned_steps}) for key in ("tune_scales", "reconstruct")
              if (budget := getattr(step, key, None)) is not None}
    if step.method == "autoround":
        update["iters"] = learned_steps
    return step.model_copy(update=update) if update else step


def cut_recipe(name: str, distill_steps: int, learned_steps: int) -> tuple[Recipe, bool]:
    """The built-in `name` with its budgets cut, and whether anything was cut."""
    recipe = get_recipe(name)
    steps = tuple(cut_step(s, distill_steps, learned_steps) for s in recipe.steps)
    if all(a is b for a, b in zip(steps, recipe.steps)):
        return recipe, False
    return recipe.model_copy(update={"steps": steps}), True
