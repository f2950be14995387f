"""Greedy decoding with a static KV cache, eager or compiled.

With a static cache (transformers' `StaticCache`, sized once) every one-token step has the same
shapes, so `torch.compile` (inductor) traces the step once and replays it: the Python and
framework work per layer, which dominates a small model's decode on a CPU, goes away, and the
packed kernels (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`) run as extern calls inside
the compiled graph. On a GPU the step is also captured as a CUDA graph ("reduce-overhead").

The prompt (prefill) always runs eager: its length varies, and one pass does not repay a compile.
The first compiled step pays the compilation; `StepTimes.compile_s` reports it apart.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from slimkit.errors import SlimkitError


@dataclass
class StepTimes:
    """Seconds of each decode step; the first compiled one includes the compilation."""

    first_s: float = 0.0
    rest_s: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.rest_s) * 1e3 if self.rest_s else self.first_s * 1e3

    @property
    def compile_s(self) -> float:
        """The first step's time beyond a normal step's: what compiling cost."""
        return max(self.first_s - self.median_ms / 1e3, 0.0)


@dataclass
class Generation:
    tokens: list[int]
    prefill_s: float
    steps: StepTimes


def _max_positions(model) -> int | None:
    limit = getattr(model.config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def _compiled_step(forward, device: torch.device):
    """`forward` compiled for one model whose weights and modules do not change while it decodes.
    Dynamo's guards on every module attribute and parameter were measured at ~2.4 ms of each
    ~15 ms int4 step (SmolLM2, 2 threads), so on the CPU they are skipped; the compiled caches are
    reset first, so that no graph traced for another model (same code object) can be replayed here."""
    if device.type == "cuda":  # CUDA graphs replay the step (torch.compile takes a mode or options, not both)
        return torch.compile(forward, mode="reduce-overhead", dynamic=False)
    torch.compiler.reset()
    return torch.compile(forward, dynamic=False,
                         options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})


class StaticDecoder:
    """One model, one static KV cache of `max_len` positions, batch 1; `compiled` picks the step."""

    def __init__(self, model, max_len: int, compiled: bool):
        from transformers import StaticCache

        limit = _max_positions(model)
        if limit is not None and max_len > limit:
            raise SlimkitError(f"{max_len} positions (prompt + new tokens) exceed this model's "
                               f"max_position_embeddings {limit}: shorten the prompt or --max-new-tokens")
        self.model, self.max_len, self.compiled = model.eval(), max_len, compiled
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.device = next(model.parameters()).device
        self._step = self._forward
        if compiled:
            self._step = _compiled_step(self._forward, self.device)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=tokens, cache=self.cache, cache_position=positions, use_cache=True)
        return out.logits[:, -1].float()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Empties the cache and reads the prompt [1, n] (eager); the last position's logits."""
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise SlimkitError(f"decoding takes one non-empty prompt [1, n], got shape {tuple(ids.shape)}")
        if ids.shape[1] >= self.max_len:
            raise SlimkitError(f"the prompt has {ids.shape[1]} tokens; the cache holds {self.max_len}")
        self.cache.reset()
        return self._forward(ids.to(self.device), torch.arange(ids.shape[1], device=self.device))

    @torch.no_grad()
    def step(self, token: int, position: int) -> torch.Tensor:
        """Logits after feeding `token` at `position` (the cache holds positions before it)."""
        tokens = torch.tensor([[token]], device=self.device)
        return self._step(tokens, torch.tensor([position], device=self.device)).clone()

    def generate(self, ids: torch.Tensor, new_tokens: int, stop: set[int] = frozenset(),
                 on_token: Callable[[int], None] = lambda t: None) -> Generation:
        """Greedy continuation of `ids` [1, n]: at most `new_tokens`, ending early on a `stop` token."""
        if ids.shape[-1] + new_tokens > self.max_len:
            raise SlimkitError(f"{ids.shape[-1]} prompt tokens + {new_tokens} new ones exceed the cache's "
                               f"{self.max_len} positions")
        t0 = time.perf_counter()
        token = int(self.prefill(ids).argmax(-1))
        self._sync()
        prefill_s, tokens, steps = time.perf_counter() - t0, [token], StepTimes()
        on_token(token)
        for position in range(ids.shape[-1], ids.shape[-1] + new_tokens - 1):
            if token in stop:
                break
            t0 = time.perf_counter()
            token = int(self.step(token, position).argmax(-1))
            self._sync()
            seconds = time.perf_counter() - t0
            if position == ids.shape[-1]:
                steps.first_s = seconds
            else:
                steps.rest_s.append(seconds)
            tokens.append(token)
            on_token(token)
        return Generation(tokens, prefill_s, steps)


def stop_tokens(model, tokenizer) -> set[int]:
    """The ids that end a generation: the generation config's eos ids, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])
