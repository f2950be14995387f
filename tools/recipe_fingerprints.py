"""Fingerprints of every built-in recipe's output on a model: sha256 of model.safetensors and ppl.

Used to show that a refactor changed no result: run it before and after, and compare the JSON.
Small settings keep it to minutes; distill steps are cut to --distill-steps (the code path runs,
the budget is not the point). Example:

    python tools/recipe_fingerprints.py -o /tmp/before.json
    python tools/recipe_fingerprints.py -o /tmp/after.json && diff /tmp/before.json /tmp/after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

from slimkit.protocol import EvalSettings
from slimkit.recipes import builtin_recipes, get_recipe
from slimkit.workflow import compress_to_dir


def shortened(recipe, distill_steps: int):
    steps = tuple(s.model_copy(update={"steps": distill_steps, "checkpoint_every": distill_steps})
                  if s.method == "distill" else s for s in recipe.steps)
    return recipe.model_copy(update={"steps": steps})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--output", "-o", required=True)
    parser.add_argument("--distill-steps", type=int, default=2)
    args = parser.parse_args()
    recipes = [shortened(get_recipe(name), args.distill_steps) for name in builtin_recipes()]
    settings = EvalSettings(seqlen=256, max_windows=2, calibration_windows=8, calibration_seqlen=128)
    result = {}
    with tempfile.TemporaryDirectory(prefix="slimkit-fingerprints-") as tmp:  # ~11 GB for SmolLM2: removed
        work = Path(tmp)
        reports = compress_to_dir(args.model, recipes, work / "out", settings, runs_dir=str(work / "runs"),
                                  log=print)
        for report in reports:
            weights = Path(report.output) / "model.safetensors"
            result[report.recipe_name] = {"sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                                          "ppl": report.compressed.value}
    Path(args.output).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
