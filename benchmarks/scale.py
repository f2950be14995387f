"""Memory and time of `slimkit compress --stream` as the model grows: SmolLM2-135M, a synthetic
Llama-3.2-1B and a synthetic Llama-3.1-8B (bf16, random weights; `benchmarks/synthetic.py`).

Each run is a fresh `slimkit compress` process; its peak RSS is the kernel's high-water mark for
that process (ru_maxrss of the child). The target is flat memory in model size apart from one
block. SmolLM2 is also measured in memory (`--stream off`) for contrast.

    python -m benchmarks.scale -o runs/scale                      # RTN and GPTQ, all sizes
    python -m benchmarks.scale --models smollm2-135m,llama-3.2-1b --recipes gptq-int4-g128
    python -m benchmarks.scale --distributed     # 1 process vs 2 gloo processes on SmolLM2
    python -m benchmarks.scale --verify OUT SOURCE 17   # a streamed RTN output, without loading it
    python -m benchmarks.scale --pack          # `slimkit pack --format int4` streamed vs in memory
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES = {
    "rtn-int4-g128": {"name": "rtn-int4-g128", "steps": [{"method": "rtn_quantize", "bits": 4, "group_size": 128}]},
    "gptq-int4-g128": {"name": "gptq-int4-g128",
                       "steps": [{"method": "gptq", "bits": 4, "group_size": 128, "act_order": True}]},
}
CALIBRATION = (8, 128)  # windows x tokens: small, as a big model on a small machine would use
EVAL = ("--windows", "1", "--seqlen", "128")


def model_path(name: str) -> str:
    from benchmarks.synthetic import SHAPES, synthetic_checkpoint

    return str(synthetic_checkpoint(name)) if name in SHAPES else name


def _measured(command: list[str]) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS bytes) of `command` run alone in a child process."""
    probe = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
             "rc = subprocess.run(sys.argv[1:]).returncode; "
             "print(json.dumps([rc, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")
    out = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True)
    rc, wall, kib = json.loads(out.stdout.strip().splitlines()[-1])
    return rc, wall, kib * 1024


def measure(model: str, recipe: str, stream: str, work: Path) -> dict:
    from slimkit.models.streamed import CheckpointShards

    path = model_path(model)
    data = json.loads(json.dumps(RECIPES[recipe]))
    if model == "smollm2-135m":  # 576 columns: groups of 64
        data["steps"][0]["group_size"] = 64
        data["name"] = recipe = recipe.replace("g128", "g64")
    recipe_file = work / f"{recipe}.yaml"
    recipe_file.write_text(json.dumps(data))
    output = work / f"{Path(path).name}-{recipe}-{stream}"
    windows, seqlen = CALIBRATION
    command = [sys.executable, "-m", "slimkit", "compress", path, "-r", str(recipe_file), "-o", str(output),
               "--overwrite", "--stream", stream, *EVAL, "--calibration-windows", str(windows),
               "--calibration-seqlen", str(seqlen)]
    rc, wall, peak = _measured(command)
    if rc != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {rc}")
    report = json.loads((output / "report.json").read_text())
    shutil.rmtree(output)  # an 8B output is 16 GB
    from slimkit.models.loading import gguf_cache_dir, resolve

    source, _ = resolve(path)
    size = CheckpointShards.of_dir(gguf_cache_dir(source) if source.suffix == ".gguf" else source).nbytes()
    compress_s = report["timing"]["compress_s"]
    calibrated = bool(report["compression"]["engine"])
    return {"model": model, "recipe": recipe, "stream": stream, "model_gb": size / 1e9, "peak_rss_gb": peak / 1e9,
            "wall_s": wall, "compress_s": compress_s,
            "calibration_tokens_per_s": windows * seqlen / compress_s if calibrated else None,
            "timing": report["timing"], "engine": report["compression"]["engine"], "measured": time.strftime("%Y-%m-%d %H:%M:%S")}


def pack_row(model: str, stream: str, work: Path, fmt: str = "int4", group_size: int = 128) -> dict:
    """Peak RSS and wall time of `slimkit pack MODEL --format int4` (streamed or in memory)."""
    output = work / f"{Path(model).name}-{fmt}-{stream}"
    command = [sys.executable, "-m", "slimkit", "pack", model_path(model), "--format", fmt, "--group-size",
               str(group_size), "-o", str(output), "--overwrite", "--stream", stream]
    rc, wall, peak = _measured(command)
    if rc != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {rc}")
    from slimkit.paths import PackedDir

    summary = json.loads(PackedDir(output).summary.read_text())
    shutil.rmtree(output)
    return {"model": model, "format": f"{fmt} g{group_size}", "stream": stream, "peak_rss_gb": peak / 1e9,
            "wall_s": wall, "file_gb": summary["file_bytes"] / 1e9, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}


def distributed_rows(work: Path, recipe: str = "gptq-int4-g64", windows: int = 128, seqlen: int = 512) -> list[dict]:
    """SmolLM2 calibrated by 1 process (all threads) and by 2 gloo processes x 1 thread, same
    data; wall time of each, and whether the outputs are bit-identical."""
    import os

    import torch
    from safetensors import safe_open

    base = [sys.executable, "-m", "slimkit", "compress", "smollm2-135m", "-r", recipe, "--overwrite", "--stream", "off",
            "--calibration-windows", str(windows), "--calibration-seqlen", str(seqlen), "--windows", "1"]
    launch = {"1 process": [], "2 processes x 1 thread": [sys.executable, "-m", "torch.distributed.run",
                                                           "--nproc_per_node", "2", "--master_port", "29561", "-m"]}
    rows, outputs = [], []
    for label, prefix in launch.items():
        out = work / label.replace(" ", "-")
        command = [*prefix, *base[2:], "-o", str(out)] if prefix else [*base, "-o", str(out)]
        env_threads = "1" if prefix else str(os.cpu_count())
        os.environ["OMP_NUM_THREADS"] = env_threads
        rc, wall, peak = _measured(command)
        os.environ.pop("OMP_NUM_THREADS")
        report = json.loads((out / "report.json").read_text())
        rows.append({"mode": label, "wall_s": wall, "compress_s": report["timing"]["compress_s"], "rc": rc,
                     "calibration": f"{windows} x {seqlen}", "recipe": recipe})
        outputs.append(out)
    tensors = [{} for _ in outputs]
    for got, out in zip(tensors, outputs):
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            got.update({k: f.get_tensor(k) for k in f.keys()})
    same = tensors[0].keys() == tensors[1].keys() and all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])
    for row in rows:
        row["outputs_identical"] = same
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | recipe | mode | size GB | peak RSS GB | wall s | compress s | calib tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tps = f"{r['calibration_tokens_per_s']:.1f}" if r["calibration_tokens_per_s"] else "-"
        lines.append(f"| {r['model']} | {r['recipe']} | {r['stream']} | {r['model_gb']:.2f} | {r['peak_rss_gb']:.2f} "
                     f"| {r['wall_s']:.0f} | {r['compress_s']:.0f} | {tps} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,llama-3.2-1b,llama-3.1-8b")
    parser.add_argument("--recipes", default="rtn-int4-g128,gptq-int4-g128")
    parser.add_argument("-o", "--output", type=Path, default=Path("runs/scale"))
    parser.add_argument("--distributed", action="store_true", help="instead: SmolLM2 GPTQ (128 x 512) calibrated "
                        "by 1 process vs 2 gloo processes x 1 thread")
    parser.add_argument("--pack", action="store_true", help="instead: `slimkit pack --format int4` of each model, "
                        "streamed (and in memory for SmolLM2)")
    parser.add_argument("--verify", nargs=3, metavar=("OUTPUT", "SOURCE", "BLOCK"),
                        help="instead: check a streamed rtn-int4-g128 OUTPUT of checkpoint SOURCE (verify_output)")
    args = parser.parse_args(argv)
    if args.verify:
        output, source, block = args.verify
        print(json.dumps(verify_output(Path(output), Path(source), int(block))))
        return
    args.output.mkdir(parents=True, exist_ok=True)
    if args.pack:
        with tempfile.TemporaryDirectory(prefix="slimkit-scale-") as tmp:
            rows = [pack_row(m, stream, Path(tmp), group_size=64 if m == "smollm2-135m" else 128)
                    for m in args.models.split(",") for stream in (["off", "on"] if m == "smollm2-135m" else ["on"])]
        (args.output / "pack.json").write_text(json.dumps(rows, indent=2))
        for row in rows:
            print(json.dumps(row))
        return
    if args.distributed:
        with tempfile.TemporaryDirectory(prefix="slimkit-scale-") as tmp:
            rows = distributed_rows(Path(tmp))
        (args.output / "distributed.json").write_text(json.dumps(rows, indent=2))
        for row in rows:
            print(json.dumps(row))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="slimkit-scale-") as tmp:
        for model in args.models.split(","):
            for recipe in args.recipes.split(","):
                modes = ["off", "on"] if model == "smollm2-135m" else ["on"]
                for stream in modes:
                    rows.append(measure(model, recipe, stream, Path(tmp)))
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
    (args.output / "scale.json").write_text(json.dumps(rows, indent=2))
    (args.output / "scale.md").write_text(table(rows) + "\n")
    print(table(rows))



def verify_output(output: Path, source: Path, block: int, recipe: str = "rtn-int4-g128") -> dict:
    """A streamed output of a big model, checked without loading it: transformers builds it on the
    meta device and the shard index names exactly its tensors; block `block`'s tensors equal RTN
    computed on that block alone from the source checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from slimkit.models.streamed import CheckpointShards
    from slimkit.numerics.rtn import rtn_quantize
    from slimkit.recipes.schema import parse_recipe

    config = AutoConfig.from_pretrained(output)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    index = json.loads((output / "model.safetensors.index.json").read_text())
    expected = {n for n in model.state_dict() if not (config.tie_word_embeddings and n == "lm_head.weight")}
    assert set(index["weight_map"]) == expected, "the index does not name the model's tensors"
    assert all((output / f).is_file() for f in set(index["weight_map"].values()))
    spec = parse_recipe(RECIPES[recipe]).steps[0].spec()
    written, original = CheckpointShards.of_dir(output), CheckpointShards.of_dir(source)
    prefix = f"model.layers.{block}."
    names = original.under(prefix)
    got, src = written.read(names), original.read(names, torch.float32)
    for name in names:
        want = rtn_quantize(src[name], spec, name)[0] if src[name].dim() == 2 else src[name]
        assert torch.equal(got[name], want.to(got[name].dtype)), f"{name} differs from RTN of the source"
    return {"tensors": len(index["weight_map"]), "shards": len(set(index["weight_map"].values())),
            "checked_block": block, "checked_tensors": len(names)}


if __name__ == "__main__":
    main()
