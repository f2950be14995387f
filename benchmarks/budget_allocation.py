"""slimkit's allocated GGUFs against llama.cpp's imatrix mixes, at the same bytes, judged by llama.cpp.

    make peers     # once: llama.cpp's tools in .peers/llama.cpp/bin
    python -m benchmarks.budget_allocation -o out/budgets                 # quick: 16 x 256 calibration
    python -m benchmarks.budget_allocation -o out/budgets --full          # 128 x 512 calibration

- the base: the dense model exported to an F32 GGUF; llama-perplexity's distributions on the
  evaluation text are the KLD reference of every other file;
- llama.cpp: llama-imatrix on slimkit's calibration windows (decoded to text), then llama-quantize
  with that imatrix to each file type of `--types` (Q2_K ... Q5_K_M);
- slimkit: `gguf_allocate` with `target_size` = each llama.cpp file's bytes (the same windows,
  one sensitivity measurement for every size), exported with `--gguf-type auto`; and with
  `max_decode_ms` = the decode ms/token llama-bench measures for each file type of `--speed-of`
  (the best file predicted to decode as fast as llama.cpp's), whose prediction is then checked
  against llama-bench of the file it made;
- every file scored by llama-perplexity (ppl, KLD) and timed by llama-bench (same threads,
  interleaved rounds).

Writes budget_allocation.json, budget_allocation.md (the table, slimkit's KLD over llama.cpp's at
each size) and budget_allocation.png (KLD against file size) into the output dir.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.peer_llamacpp import calibration_text
from slimkit.benchmarks.llamacpp import llamacpp_quantize, make_imatrix
from slimkit.benchmarks.llamacpp_model import gguf_of, llamacpp_table, measure_all
from slimkit.protocol import FULL, QUICK, BenchSettings, EvalSettings
from slimkit.quantization.config import ALLOCATABLE_TYPES
from slimkit.results import LlamaCppRow

TYPES = "Q2_K,Q3_K_S,Q3_K_M,Q4_K_S,Q4_K_M,Q5_K_M"


def llamacpp_files(base: Path, calibration: Path, work: Path, types: list[str], windows: int, seqlen: int
                   ) -> dict[str, Path]:
    imatrix = make_imatrix(base, calibration, work / "imatrix.gguf", seqlen, windows)
    return {t: llamacpp_quantize(base, work / f"llamacpp-{t.lower()}.gguf", t, imatrix) for t in types}


def allocated_files(model: str, budgets: dict[str, dict], work: Path, settings: EvalSettings,
                    candidates: list[str]) -> tuple[dict[str, Path], list[dict]]:
    """gguf_allocate to each budget (a name -> its target_size or max_kld), each exported; with
    each run's predicted KLD (calibration windows) and the KLD slimkit measured (evaluation windows)."""
    from slimkit.compression.memory import compress_to_dir
    from slimkit.recipes import parse_recipe

    recipes = [parse_recipe({"name": name, "steps": [{"method": "gguf_allocate", "types": candidates, **budget}]})
               for name, budget in budgets.items()]
    reports = compress_to_dir(model, recipes, work / "compressed", settings, log=print)
    predictions = []
    for r, rep in zip(recipes, reports):
        detail = rep.compression.structure_and_training[0]
        predictions.append({"name": r.name, **budgets[r.name], "predicted_kld": detail["predicted"]["kld"],
                            "slimkit_kld": rep.compressed.divergence.mean_kld}
                           | ({"predicted_decode_ms": detail["predicted"]["llamacpp_decode_ms"]}
                              if "max_decode_ms" in budgets[r.name] else {}))
    return {r.name: gguf_of(str(work / "compressed" / r.name), work, baseline=False) for r in recipes}, predictions


def speed_budgets(files: dict[str, Path], types: list[str], threads: int) -> dict[str, dict]:
    """A `max_decode_ms` budget per llama.cpp file of `types`: its decode ms/token by llama-bench
    (interleaved rounds, fastest kept), with the settings the files are timed with at the end."""
    from slimkit.benchmarks.llamacpp_model import interleaved_speed

    if not types:
        return {}
    speeds = interleaved_speed([files[t] for t in types], BenchSettings(), threads, rounds=3)
    return {f"allocated-{t.lower()}-speed": {"max_decode_ms": round(1000.0 / s["decode_tok_s"], 3)}
            for t, s in zip(types, speeds)}


def time_bounds(predictions: list[dict], rows: list[LlamaCppRow]) -> list[str]:
    """The --max-decode-ms runs: the budget (llama.cpp's file's ms), the predicted and measured ms,
    and the KLD of both files."""
    by = {r.model: r for r in rows}
    lines = ["| as fast as | budget ms (llama.cpp's file) | predicted ms | slimkit measured ms | llama.cpp measured ms "
             "| llama.cpp MiB | slimkit MiB | llama.cpp KLD | slimkit KLD | slimkit / llama.cpp |", "|" + "---|" * 10]
    for p in predictions:
        if "max_decode_ms" in p:
            theirs = by[f"{p['speed_of']} + imatrix"]
            ours = by[p["name"]]
            lines.append(f"| {p['speed_of']} | {p['max_decode_ms']:.3f} | {p['predicted_decode_ms']:.3f} | "
                         f"{1000.0 / ours.decode_tok_s:.3f} | {1000.0 / theirs.decode_tok_s:.3f} | {theirs.file_mb:.2f} | {ours.file_mb:.2f} | "
                         f"{theirs.mean_kld:.4f} | {ours.mean_kld:.4f} | {ours.mean_kld / theirs.mean_kld:.2f}x |")
    return lines


def kld_bounds(predictions: list[dict], rows: list[LlamaCppRow]) -> list[str]:
    """The --max-kld runs: the bound, the allocation's predicted KLD, and the measured ones."""
    by = {r.model: r for r in rows}
    lines = ["| max_kld | file MiB | predicted KLD (calibration) | slimkit KLD (evaluation windows) | "
             "llama-perplexity KLD |", "|" + "---|" * 5]
    for p in predictions:
        if "max_kld" in p:
            row = by[p["name"]]
            lines.append(f"| {p['max_kld']} | {row.file_mb:.2f} | {p['predicted_kld']:.4f} | {p['slimkit_kld']:.4f} | "
                         f"{row.mean_kld:.4f} |")
    return lines


def comparison(rows: list[LlamaCppRow], types: list[str]) -> list[str]:
    by = {r.model: r for r in rows}
    lines = ["| size of | llama.cpp MiB | slimkit MiB | llama.cpp KLD | slimkit KLD | slimkit / llama.cpp | "
             "llama.cpp ppl | slimkit ppl |", "|" + "---|" * 8]
    for t in types:
        theirs, ours = by[f"{t} + imatrix"], by[f"allocated-{t.lower()}-size"]
        lines.append(f"| {t} | {theirs.file_mb:.2f} | {ours.file_mb:.2f} | {theirs.mean_kld:.4f} | "
                     f"{ours.mean_kld:.4f} | {ours.mean_kld / theirs.mean_kld:.2f}x | {theirs.ppl:.3f} | {ours.ppl:.3f} |")
    return lines


def plot(rows: list[LlamaCppRow], path: Path, model: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for made_by, marker in (("llama.cpp", "o"), ("slimkit", "s")):
        points = sorted((r.file_mb, r.mean_kld, r.model) for r in rows[1:] if r.made_by.startswith(made_by))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=made_by)
        for x, y, label in points:
            ax.annotate(label.replace("allocated-", "").replace("-size", ""), (x, y), fontsize=7)
    ax.set_xlabel("whole file, MiB")
    ax.set_ylabel("mean KLD from the F32 file (llama-perplexity)")
    ax.set_yscale("log")
    ax.set_title(f"{model}: llama.cpp's imatrix mixes and slimkit's allocation at the same bytes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(model: str, output: Path, full: bool, types: list[str], threads: int, chunks: int, seed: int = 0,
        candidates: list[str] = list(ALLOCATABLE_TYPES), max_klds: list[float] = (), speed_of: list[str] = ()
        ) -> list[LlamaCppRow]:
    from slimkit.io.outputs import output_directory

    protocol = FULL if full else QUICK
    windows, seqlen = protocol.calibration_windows, protocol.calibration_seqlen
    settings = EvalSettings(max_windows=2, calibration_windows=windows, calibration_seqlen=seqlen, seed=seed)
    with output_directory(output, False, inputs=[model], command="budget_allocation") as tmp:
        base = gguf_of(model, tmp, baseline=True)
        calibration = calibration_text(model, tmp / "calibration.txt", windows, seqlen, seed)
        theirs = llamacpp_files(base, calibration, tmp, types, windows, seqlen)
        budgets = {f"allocated-{t.lower()}-size": {"target_size": f.stat().st_size} for t, f in theirs.items()}
        budgets |= {f"allocated-max-kld-{k}": {"max_kld": k} for k in max_klds}
        speed = speed_budgets(theirs, speed_of, threads)
        budgets |= speed
        ours, predictions = allocated_files(model, budgets, tmp, settings, candidates)
        for p, t in zip([p for p in predictions if "max_decode_ms" in p], speed_of):
            p["speed_of"] = t
        entries = [(f"{model} F32", "slimkit export (base)", base)]
        entries += [(f"{t} + imatrix", "llama.cpp llama-quantize", f) for t, f in theirs.items()]
        entries += [(name, "slimkit gguf_allocate", f) for name, f in ours.items()]
        rows = measure_all(entries, tmp, BenchSettings(windows=chunks), threads, rounds=3)
        (tmp / "budget_allocation.json").write_text(json.dumps({"rows": [r.to_dict() for r in rows],
                                                                "allocations": predictions}, indent=2))
        plot(rows, tmp / "budget_allocation.png", model)
        text = "\n".join([f"# Allocated GGUFs vs llama.cpp's imatrix mixes on {model}", "",
                          *comparison(rows, types), "", *kld_bounds(predictions, rows), "",
                          *time_bounds(predictions, rows), "", llamacpp_table(rows), "",
                          f"- slimkit's candidate types: {', '.join(candidates)}",
                          f"- calibration: {windows} x {seqlen} tokens (seed {seed}), the same windows for "
                          "llama-imatrix and slimkit", f"- scored by llama-perplexity on {chunks} chunks of 512 of "
                          "the evaluation text; KLD vs the F32 base", f"- speed: llama-bench, {threads} threads, "
                          "3 interleaved rounds", "", "![KLD vs size](budget_allocation.png)", ""])
        (tmp / "budget_allocation.md").write_text(text)
    print(text)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("-o", "--output", type=Path, required=True, help="output dir (written atomically)")
    p.add_argument("--full", action="store_true", help="the full protocol's calibration: 128 x 512 (quick: 16 x 256)")
    p.add_argument("--types", default=TYPES, help="llama.cpp file types whose sizes are the budgets")
    p.add_argument("--chunks", type=int, default=32, help="llama-perplexity chunks of 512 tokens scored")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--candidates", default=",".join(ALLOCATABLE_TYPES), help="slimkit's candidate GGML types")
    p.add_argument("--max-kld", default="0.02", help="comma-separated --max-kld budgets also allocated ('' for none)")
    p.add_argument("--speed-of", default="Q4_K_S,Q4_K_M",
                   help="llama.cpp file types (among --types) whose measured decode ms are --max-decode-ms budgets "
                        "('' for none)")
    a = p.parse_args(argv)
    speed_of = [t for t in a.speed_of.split(",") if t]
    if not set(speed_of) <= set(a.types.split(",")):
        p.error(f"--speed-of {a.speed_of}: each must be one of --types {a.types}")
    run(a.model, a.output, a.full, a.types.split(","), a.threads, a.chunks, a.seed, a.candidates.split(","),
        [float(k) for k in a.max_kld.split(",") if k], speed_of)


if __name__ == "__main__":
    main()
