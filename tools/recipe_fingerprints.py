"""Fingerprints of built-in recipes' outputs on a model, through the real `slimkit compress`: a
sha256 over every tensor (name, dtype, shape, bytes; so a sharded streamed output and a single
file compare), and the ppl the report states.

Used to show that a refactor changed no result, and that the three sources agree: run it before
and after (or with each --source), and compare the JSON. Small settings keep it to minutes; distill
steps are cut to --distill-steps, AutoRound's, scale tuning's and reconstruction's to --learned-steps
(the code path runs, the budget is not the point). Examples:

    python tools/recipe_fingerprints.py -o /tmp/before.json
    python tools/recipe_fingerprints.py -o /tmp/after.json && diff /tmp/before.json /tmp/after.json
    python tools/recipe_fingerprints.py --source streamed -r rtn-int8,gptq-int4-g64 -o /tmp/streamed.json
    python tools/recipe_fingerprints.py --source torchrun -r gptq-int4-g64 -o /tmp/torchrun.json

--source: memory (`--stream off`), streamed (`--stream on`) or torchrun (2 processes on the CPU,
gloo). Another checkout's code runs with PYTHONPATH=/that/checkout/src.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's benchmarks/ (not installed)

SETTINGS = ["--seqlen", "256", "--windows", "2", "--calibration-windows", "8", "--calibration-seqlen", "128"]
COMMAND = {
    "memory": [sys.executable, "-m", "slimkit.cli.main"],
    "streamed": [sys.executable, "-m", "slimkit.cli.main"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "slimkit.cli.main"],
}


def tensors_digest(model_dir: Path) -> str:
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    files = sorted(model_dir.glob("model*.safetensors"))
    named = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            named.update({key: (file, key) for key in f.keys()})
    for key in sorted(named):
        with safe_open(str(named[key][0]), framework="pt") as f:
            t = f.get_tensor(key).contiguous()
        digest.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def recipe_files(names: list[str], work: Path, distill_steps: int, learned_steps: int) -> list[str]:
    """Built-in names as they are, or as /tmp YAML files with their training budgets cut."""
    from benchmarks.budgets import cut_recipe

    out = []
    for name in names:
        recipe, cut = cut_recipe(name, distill_steps, learned_steps)
        if not cut:
            out.append(name)
            continue
        path = work / f"{name}.yaml"
        path.write_text(recipe.to_yaml())
        out.append(str(path))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--output", "-o", required=True)
    parser.add_argument("--source", choices=sorted(COMMAND), default="memory")
    parser.add_argument("--recipes", "-r", default="", help="comma-separated built-ins (default: all)")
    parser.add_argument("--distill-steps", type=int, default=2)
    parser.add_argument("--learned-steps", type=int, default=4, help="AutoRound, scale-tuning and reconstruction steps per block")
    args = parser.parse_args()
    from slimkit.recipes import builtin_recipes

    names = args.recipes.split(",") if args.recipes else list(builtin_recipes())
    result = {}
    with tempfile.TemporaryDirectory(prefix="slimkit-fingerprints-") as tmp:  # ~11 GB for every SmolLM2 recipe
        work = Path(tmp)
        recipes = [a for r in recipe_files(names, work, args.distill_steps, args.learned_steps) for a in ("-r", r)]
        stream = ["--stream", "on" if args.source == "streamed" else "off"]
        out = work / "out"
        subprocess.run([*COMMAND[args.source], "compress", args.model, *recipes, "-o", str(out), *SETTINGS, *stream],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"} if args.source == "torchrun" else None)
        for name in names:
            model_dir = out if len(names) == 1 else out / name
            report = json.loads((model_dir / "report.json").read_text())
            result[name] = {"tensors_sha256": tensors_digest(model_dir), "ppl": report["compressed"]["value"]}
        result["_summary_files"] = sorted(p.name for p in out.glob("summary.*"))
    Path(args.output).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
