"""Training data for LLM distillation: corpus windows, or text the teacher writes itself."""

from __future__ import annotations

import torch
from torch import nn

from slimkit.errors import DataError
from slimkit.progress import NoProgress, Progress


@torch.no_grad()
def teacher_generated_windows(teacher: nn.Module, prompts: torch.Tensor, seqlen: int, seed: int = 0,
                              temperature: float = 1.0, batch_size: int = 16,
                              progress: Progress = NoProgress()) -> torch.Tensor:
    """Data distillation: the teacher continues each prompt (rows of token ids, e.g. the first
    tokens of corpus windows) by sampling until `seqlen` tokens; returns [n, seqlen] ids."""
    n, plen = prompts.shape
    if plen >= seqlen:
        raise DataError(f"prompts of {plen} tokens leave nothing to generate in windows of {seqlen}")
    teacher.eval()
    torch.manual_seed(seed)
    out = []
    for i in progress.track(range(0, n, batch_size), "teacher writes text", total=-(-n // batch_size)):
        chunk = prompts[i : i + batch_size]
        gen = teacher.generate(input_ids=chunk, attention_mask=torch.ones_like(chunk), do_sample=True,
                               temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=seqlen - plen,
                               min_new_tokens=seqlen - plen, pad_token_id=teacher.config.eos_token_id)
        out.append(gen[:, :seqlen])
    return torch.cat(out)
