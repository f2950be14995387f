"""llama.cpp as the judge of a GGUF: its own tools, run as they are, and slimkit's scoring of the
same text the way `llama-perplexity` scores it.

The tools come from `make peers` (`.peers/llama.cpp/bin`, or the directory in $SLIMKIT_LLAMA_CPP);
slimkit never links or imports llama.cpp. `llama-perplexity` tokenizes the whole text (BOS first
when the vocabulary asks for one), cuts it into chunks of `ctx` tokens, puts BOS at the start of
each chunk (same condition) and scores the second half of every chunk: the tokens after position
ctx/2, each predicted from all before it in its chunk.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

from slimkit.errors import SlimkitError

TOOLS_DIR = Path(".peers/llama.cpp/bin")
_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+)")


def tool(name: str) -> Path | None:
    """A llama.cpp tool built by `make peers`, or None."""
    root = Path(os.environ.get("SLIMKIT_LLAMA_CPP", TOOLS_DIR))
    path = root / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


# llama.cpp built for the host CPU repacks weights at load into the CPU's own layouts (interleaved
# Q4_0 for AVX-512, AMX tiles). On Intel Xeons with AVX-512 and AMX that path segfaulted in
# llama-perplexity, llama-imatrix and llama-bench on every model: a tool killed by a signal is run
# once more with repacking off (`--repack 0` for llama-bench, LLAMA_ARG_REPACK=0 for the tools that
# share llama.cpp's common options), and `repacked(name)` says which way its results were made.
_NO_REPACK = {"llama-bench": (["--repack", "0"], {})}
_COMMON_NO_REPACK: tuple[list[str], dict[str, str]] = ([], {"LLAMA_ARG_REPACK": "0"})
_REPACK_OFF: set[str] = set()  # tools that crashed with repacking on, in this process


def repacked(name: str) -> bool:
    """Whether `name`'s runs in this process used llama.cpp's weight repacking (its default)."""
    return name not in _REPACK_OFF


def _crashed(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode < 0 or proc.returncode in (128 + 11, 128 + 6)  # a signal: SIGSEGV, SIGABRT


def _invoke(name: str, binary: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    if name in _REPACK_OFF:
        extra_args, extra_env = _NO_REPACK.get(name, _COMMON_NO_REPACK)
        args, env = [*args, *extra_args], {**env, **extra_env}
    return subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, timeout=3600)


def _run(name: str, args: list[str], what: str, stdout_only: bool = False, spin: bool = False) -> str:
    """A llama.cpp tool's output (stdout and its log on stderr, or stdout alone); a clear error
    when it is missing or fails. Its OpenMP threads sleep between operations unless `spin`: the
    scoring tools then leave the machine usable, and a timing runs as llama.cpp normally does
    (spinning: measured 4x the decode tok/s of sleeping threads on SmolLM2 at 2 threads)."""
    binary = tool(name)
    if binary is None:
        raise SlimkitError(f"{name} is not built: run `make peers` (or set SLIMKIT_LLAMA_CPP to a llama.cpp bin dir)")
    env = dict(os.environ)
    if not spin:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    proc = _invoke(name, binary, args, env)
    if _crashed(proc) and name not in _REPACK_OFF:
        _REPACK_OFF.add(name)  # the AVX-512/AMX repacking crash: once more without it
        proc = _invoke(name, binary, args, env)
    if proc.returncode:
        raise SlimkitError(f"{name} failed on {what} (exit {proc.returncode}"
                           f"{', repacking off' if name in _REPACK_OFF else ''}):\n{(proc.stdout + proc.stderr)[-2000:]}")
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


def _scoring_args(ctx: int, chunks: int, threads: int) -> list[str]:
    return ["-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks), "-t", str(threads)]


def llamacpp_perplexity(gguf: Path, text_file: Path, ctx: int = 512, chunks: int = 8, threads: int = 2,
                        save_logits: Path | None = None) -> float:
    """`llama-perplexity`'s final estimate on `text_file`; with `save_logits`, it also stores the
    model's distributions there (--kl-divergence-base) for `llamacpp_divergence`."""
    extra = ["--kl-divergence-base", str(save_logits)] if save_logits is not None else []
    out = _run("llama-perplexity", ["-m", str(gguf), "-f", str(text_file), *_scoring_args(ctx, chunks, threads),
                                    *extra], str(gguf))
    found = _FINAL.search(out)
    if not found:
        raise SlimkitError(f"llama-perplexity printed no estimate for {gguf}:\n{out[-2000:]}")
    return float(found.group(1))


_STATS = {"ppl": r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", "mean_kld": r"Mean\s+KLD:\s*([0-9.]+)",
          "p99_kld": r"99\.0%\s+KLD:\s*([0-9.]+)", "top1_agreement": r"Same top p:\s*([0-9.]+)"}


def llamacpp_divergence(gguf: Path, base_logits: Path, ctx: int = 512, chunks: int = 8, threads: int = 2
                        ) -> dict[str, float]:
    """llama-perplexity --kl-divergence against the base's saved distributions (same text, same
    chunks): ppl, mean and 99th-percentile KLD, top-1 agreement (a fraction)."""
    out = _run("llama-perplexity", ["-m", str(gguf), "--kl-divergence-base", str(base_logits), "--kl-divergence",
                                    *_scoring_args(ctx, chunks, threads)], str(gguf))
    stats = {}
    for key, pattern in _STATS.items():
        found = re.search(pattern, out)
        if not found:
            raise SlimkitError(f"llama-perplexity printed no '{key}' for {gguf}:\n{out[-2000:]}")
        stats[key] = float(found.group(1))
    stats["top1_agreement"] /= 100
    return stats


def llamacpp_speed(gguf: Path, prompt: int = 128, decode: int = 32, threads: int = 2, repeats: int = 3
                   ) -> dict[str, float]:
    """llama-bench: prefill and decode tokens/s (mean of `repeats`), and the weights' bytes."""
    out = _run("llama-bench", ["-m", str(gguf), "-p", str(prompt), "-n", str(decode), "-t", str(threads),
                               "-r", str(repeats), "-o", "json"], str(gguf), stdout_only=True, spin=True)
    rows = json.loads(out)
    prefill = next(r for r in rows if r["n_prompt"] and not r["n_gen"])
    decode_row = next(r for r in rows if r["n_gen"] and not r["n_prompt"])
    return {"prefill_tok_s": prefill["avg_ts"], "decode_tok_s": decode_row["avg_ts"],
            "decode_tok_s_std": decode_row["stddev_ts"], "weights_bytes": prefill["model_size"],
            "parameters": prefill["model_n_params"], "repack": repacked("llama-bench")}


def make_imatrix(base: Path, text_file: Path, out: Path, ctx: int, chunks: int, threads: int = 2) -> Path:
    """llama-imatrix on `text_file` (chunks of `ctx` tokens): the importance matrix llama-quantize reads."""
    _run("llama-imatrix", ["-m", str(base), "-f", str(text_file), "-o", str(out), *_scoring_args(ctx, chunks, threads)],
         str(base))
    return out


def llamacpp_quantize(base: Path, out: Path, ftype: str, imatrix: Path | None = None, threads: int = 2,
                      options: tuple[str, ...] = ()) -> Path:
    """llama-quantize `base` to `ftype` (Q4_0, Q4_K_M, ...), with an imatrix when given and
    llama-quantize's `options` (--pure, --tensor-type-file F, ...)."""
    extra = ["--imatrix", str(imatrix)] if imatrix is not None else []
    _run("llama-quantize", [*extra, *options, str(base), str(out), ftype, str(threads)], str(base))
    return out


@torch.no_grad()
def chunked_perplexity(model: torch.nn.Module, tokens: list[int], ctx: int = 512, chunks: int = 8,
                       bos: int | None = None) -> float:
    """`model`'s perplexity on `tokens` scored as `llama-perplexity` scores it; `bos` is put at the
    start of every chunk (None: the vocabulary adds no BOS)."""
    n = min(chunks, len(tokens) // ctx)
    if n == 0:
        raise SlimkitError(f"{len(tokens)} tokens make no chunk of {ctx}")
    first, nll, count = ctx // 2, 0.0, 0
    for i in range(n):
        chunk = torch.tensor(tokens[i * ctx : (i + 1) * ctx]).unsqueeze(0)
        if bos is not None:
            chunk[0, 0] = bos
        logits = model(input_ids=chunk).logits[0].float()
        targets = chunk[0, first + 1 :]
        nll += F.cross_entropy(logits[first:-1], targets, reduction="sum").item()
        count += targets.numel()
    return math.exp(nll / count)
