"""Where the work runs: `--device cpu|cuda|auto` resolved to a torch device, and tensors moved there.

Calibration keeps the model on the CPU (or on disk, streamed) and moves only the block being worked
on, its inputs and its statistics to the device; evaluation moves the whole model when it is in
memory. Everything else is device-agnostic torch: tensors are created beside the ones they combine with.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from slimkit.errors import SlimkitError

CHOICES = ("auto", "cpu", "cuda")


def resolve_device(choice: str = "auto") -> torch.device:
    """The torch device for a --device value, with a clear error when it cannot be used."""
    kind = choice.split(":", 1)[0]
    if kind not in CHOICES or (":" in choice and (kind != "cuda" or not choice.split(":", 1)[1].isdigit())):
        raise SlimkitError(f"--device must be one of {', '.join(CHOICES)} or cuda:N, not {choice!r}")
    if kind == "auto":
        choice = kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise SlimkitError(f"--device {choice}: no CUDA device is visible to this torch "
                               f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
                               "use --device cpu, or install a CUDA build of torch on a machine with a GPU")
        # under torchrun, each process takes the GPU of its local rank
        index = int(choice.split(":", 1)[1]) if ":" in choice else int(os.environ.get("LOCAL_RANK", "0"))
        if index >= torch.cuda.device_count():
            raise SlimkitError(f"--device {choice}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device("cuda", index)
    return torch.device(choice)


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors inside tuples, lists and dicts moved to `device` (the rest as it is)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def model_device(model: torch.nn.Module) -> torch.device:
    """Where `model`'s parameters are (the CPU for a model without any)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@contextmanager
def placed(model: torch.nn.Module, device: torch.device | str) -> Iterator[torch.nn.Module]:
    """`model` on `device` for the duration (evaluation), then back on the CPU. A model bigger than
    the GPU's free memory stays where it is (a streamed run is the way to put such a model on a GPU)."""
    device = torch.device(device)
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if device.type == "cpu" or (device.type == "cuda" and size > 0.9 * torch.cuda.mem_get_info(device)[0]):
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a GPU runs asynchronously; timings need this)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
