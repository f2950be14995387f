"""A batch's logits a few positions at a time, so that an evaluation's peak memory grows with the
vocabulary times ROWS_AT_ONCE, not times the window length (a 201k vocabulary: 0.4 GB a window of
512 tokens as whole fp32 logits, 0.1 GB a slice of 128).

The decoder runs once per batch to its final hidden states; the head (and what the model does to
its output: `finish_logits`) is applied to a slice of positions when a consumer asks for it. That
split is checked on a short probe against the model's own logits before it is used, and a model
where it does not hold (a head the model does not expose, an unknown post-processing) has its
logits computed whole, as before.
"""

from __future__ import annotations

import torch
from torch import nn

ROWS_AT_ONCE = 128  # positions whose full-vocabulary log-probabilities exist at one time
PROBE_TOKENS = 8
SPLIT_TOLERANCE = 1e-3  # of the largest logit on the probe (fp32 and bf16 both compute the same products)


def finish_logits(logits: torch.Tensor, config) -> torch.Tensor:
    """What a causal LM does to the head's output after the matmul, by its config: Cohere's
    logit_scale, Granite's logits_scaling, Gemma-2/3's final soft-capping."""
    if getattr(config, "logit_scale", None):
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return (decoder, head) if decoder is not None and decoder is not model and head is not None else None


def _split_logits(model: nn.Module, decoder: nn.Module, head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return finish_logits(head(hidden), model.config.get_text_config()).float()


@torch.inference_mode()
def head_applies_apart(model: nn.Module, probe: torch.Tensor) -> bool:
    """Do the decoder's hidden states through the head give the model's logits on `probe` [1, T]?"""
    parts = _parts(model)
    if parts is None:
        return False
    try:
        hidden = parts[0](input_ids=probe).last_hidden_state
        apart = _split_logits(model, *parts, hidden)
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return False
    whole = model(input_ids=probe).logits.float()
    return apart.shape == whole.shape and bool(
        (apart - whole).abs().max() <= SPLIT_TOLERANCE * whole.abs().max().clamp_min(1e-6))


class BatchLogits:
    """The logits of a batch of windows [B, T], handed out a slice of positions at a time (fp32, on
    the CPU): from the hidden states through the head when `apart`, else sliced from whole logits."""

    def __init__(self, model: nn.Module, batch: torch.Tensor, apart: bool):
        self.model = model
        with torch.inference_mode():
            if apart:
                self.decoder, self.head = _parts(model)
                self.hidden, self.whole = self.decoder(input_ids=batch).last_hidden_state, None
            else:
                self.hidden, self.whole = None, model(input_ids=batch).logits.float().cpu()

    def rows(self, window: int, start: int, stop: int) -> torch.Tensor:
        """Logits [stop - start, vocab] of positions start..stop-1 of the batch's `window`-th window."""
        if self.whole is not None:
            return self.whole[window, start:stop]
        with torch.inference_mode():
            return _split_logits(self.model, self.decoder, self.head, self.hidden[window, start:stop]).cpu()
