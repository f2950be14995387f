"""llama.cpp as the judge of a GGUF: its own tools, run as they are, and slimkit's scoring of the
same text the way `llama-perplexity` scores it.

The tools come from `make peers` (`.peers/llama.cpp/bin`, or the directory in $SLIMKIT_LLAMA_CPP);
slimkit never links or imports llama.cpp. `llama-perplexity` tokenizes the whole text (BOS first
when the vocabulary asks for one), cuts it into chunks of `ctx` tokens, puts BOS at the start of
each chunk (same condition) and scores the second half of every chunk: the tokens after position
ctx/2, each predicted from all before it in its chunk.
"""

from __future__ import annotations

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


def llamacpp_perplexity(gguf: Path, text_file: Path, ctx: int = 512, chunks: int = 8, threads: int = 2) -> float:
    """`llama-perplexity`'s final estimate on `text_file`."""
    binary = tool("llama-perplexity")
    if binary is None:
        raise SlimkitError("llama-perplexity is not built: run `make peers`")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # spinning threads stall a 2-core machine
    cmd = [str(binary), "-m", str(gguf), "-f", str(text_file), "-c", str(ctx), "-b", str(ctx),
           "--chunks", str(chunks), "-t", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    found = _FINAL.search(proc.stdout + proc.stderr)
    if proc.returncode or not found:
        raise SlimkitError(f"llama-perplexity failed on {gguf}:\n{(proc.stdout + proc.stderr)[-2000:]}")
    return float(found.group(1))


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
