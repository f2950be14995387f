"""Side by side with llama.cpp: the same base model, two ways to a GGUF, judged by llama.cpp.

    make peers     # once: llama.cpp's tools in .peers/llama.cpp/bin
    python -m benchmarks.peer_llamacpp -o out/peer-llamacpp            # quick: 16 x 256 calibration
    python -m benchmarks.peer_llamacpp -o out/peer-llamacpp --full     # 128 x 512 calibration

- the base: slimkit exports the dense model to an F32 GGUF; llama-perplexity saves its
  distributions on the evaluation text (--kl-divergence-base) and every other file is scored
  against them (--kl-divergence): ppl, mean and 99th-percentile KLD, top-1 agreement;
- llama.cpp: llama-quantize Q4_0 and Q4_K_M from that F32 file, and Q4_K_M with an imatrix that
  llama-imatrix computed on slimkit's calibration windows (decoded to text);
- slimkit: the gguf_quantize step (GPTQ on llama.cpp's grids, fitted with the same kind of
  imatrix from the same windows) for each K-quant type, and its round-to-nearest baseline
  (solver imatrix), each exported with `--gguf-type auto` (the blocks as the solver chose them);
- speed: llama-bench prefill and decode tokens/s of every file, same threads.

Writes peer_llamacpp.json (a row per file) and peer_llamacpp.md (the table) into the output dir.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slimkit.benchmarks.llamacpp import llamacpp_quantize, make_imatrix
from slimkit.benchmarks.llamacpp_model import gguf_of, llamacpp_table, measure_all
from slimkit.protocol import FULL, QUICK, BenchSettings, EvalSettings
from slimkit.results import LlamaCppRow

NOTE = ("SmolLM2-135M's packaged weights were a Q4_1 GGUF before slimkit dequantized them: every weight "
        "already sits on a 4-bit grid of blocks of 32, which favours llama.cpp's own 4-bit block grids.")


def calibration_text(model: str, path: Path, windows: int, seqlen: int, seed: int) -> Path:
    """slimkit's calibration windows, decoded, for llama-imatrix (chunks of `seqlen`)."""
    from slimkit.data import calibration_windows, load_split
    from slimkit.models import load_model

    lm = load_model(model)
    cal = calibration_windows(lm.tokenizer, load_split(), windows, seqlen, seed)
    path.write_text("".join(lm.tokenizer.decode(w[1:]) for w in cal), encoding="utf-8")
    return path


def slimkit_ggufs(model: str, types: list[str], work: Path, settings: EvalSettings) -> dict[str, Path]:
    """Compress with gguf_quantize for every type (GPTQ) and Q4_K_M by rounding, export each."""
    from slimkit.compression.memory import compress_to_dir
    from slimkit.recipes import parse_recipe

    recipes = [parse_recipe({"name": f"gguf-{t.lower()}", "steps": [{"method": "gguf_quantize", "gguf_type": t}]})
               for t in types]
    recipes.append(parse_recipe({"name": "gguf-q4_k_m-imatrix", "steps": [
        {"method": "gguf_quantize", "gguf_type": "Q4_K_M", "solver": "imatrix"}]}))
    compress_to_dir(model, recipes, work / "compressed", settings, log=print)
    return {r.name: gguf_of(str(work / "compressed" / r.name), work, baseline=False) for r in recipes}


def llamacpp_ggufs(base: Path, calibration: Path, work: Path, windows: int, seqlen: int) -> dict[str, Path]:
    imatrix = make_imatrix(base, calibration, work / "imatrix.gguf", seqlen, windows)
    return {"Q4_0": llamacpp_quantize(base, work / "llamacpp-q4_0.gguf", "Q4_0"),
            "Q4_K_M": llamacpp_quantize(base, work / "llamacpp-q4_k_m.gguf", "Q4_K_M"),
            "Q4_K_M + imatrix": llamacpp_quantize(base, work / "llamacpp-q4_k_m-imatrix.gguf", "Q4_K_M", imatrix)}


def run(model: str, output: Path, full: bool, types: list[str], threads: int, seed: int = 0, chunks: int = 32
        ) -> list[LlamaCppRow]:
    from slimkit.io.outputs import output_directory

    protocol = FULL if full else QUICK
    windows, seqlen = protocol.calibration_windows, protocol.calibration_seqlen
    settings = EvalSettings(max_windows=2, calibration_windows=windows, calibration_seqlen=seqlen, seed=seed)
    bench = BenchSettings(windows=chunks)
    with output_directory(output, False, inputs=[model], command="peer_llamacpp") as tmp:
        base = gguf_of(model, tmp, baseline=True)
        calibration = calibration_text(model, tmp / "calibration.txt", windows, seqlen, seed)
        entries = [(f"{model} F32", "slimkit export (base)", base)]
        entries += [(label, "llama.cpp llama-quantize", gguf)
                    for label, gguf in llamacpp_ggufs(base, calibration, tmp, windows, seqlen).items()]
        entries += [(label, "slimkit gguf_quantize", gguf)
                    for label, gguf in slimkit_ggufs(model, types, tmp, settings).items()]
        rows = measure_all(entries, tmp, bench, threads, rounds=3)
        table = llamacpp_table(rows)
        (tmp / "peer_llamacpp.json").write_text(json.dumps([r.to_dict() for r in rows], indent=2))
        (tmp / "peer_llamacpp.md").write_text(
            f"# slimkit vs llama.cpp on {model}\n\n{table}\n\n- calibration: {windows} x {seqlen} tokens (seed {seed}), "
            f"the same windows for llama-imatrix and slimkit\n- scored by llama-perplexity on "
            f"{rows[0].chunks if rows[0].chunks > 0 else 'all'} chunks of 512 of the evaluation text (second "
            f"halves); KLD vs the F32 base\n- speed: llama-bench ({bench.prompt}-token prefill, {bench.decode} decode "
            f"steps), {threads} threads (spinning, llama.cpp's default), 3 interleaved rounds (the fastest round ± the spread over rounds)\n- {NOTE}\n")
    print(table)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("-o", "--output", type=Path, required=True, help="output dir (written atomically)")
    p.add_argument("--full", action="store_true", help="the full protocol's calibration: 128 x 512 (quick: 16 x 256)")
    p.add_argument("--chunks", type=int, default=32, help="llama-perplexity chunks of 512 tokens scored (the base's "
                   "distributions take chunks x 512 x vocab x 2 bytes: 1.6 GB for 32)")
    p.add_argument("--types", default="Q4_K_M,Q4_K_S,Q5_K_M,Q6_K", help="slimkit's GGUF file types")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    run(args.model, args.output, args.full, args.types.split(","), args.threads, args.seed, args.chunks)


if __name__ == "__main__":
    main()
