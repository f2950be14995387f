"""What a step handler works on: the model's state (changed by steps) and the run's resources
(read by steps), plus the record of what compression did to each tensor."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from slimkit.models.adapters import ArchitectureAdapter
from slimkit.numerics.ggml_grids import GGMLCodes
from slimkit.numerics.rtn import QuantParams
from slimkit.progress import NoProgress, Progress


@dataclass
class LayerRecord:
    """What compression did to one tensor; later steps (packing, export) read it."""

    name: str
    kind: str  # attention, mlp, lm_head, embedding
    shape: tuple[int, ...]
    element_size: int = 4  # bytes per element of the dense tensor
    mask: torch.Tensor | None = None  # bool, True = kept
    quant: QuantParams | None = None
    ggml: GGMLCodes | None = None  # llama.cpp blocks chosen by a gguf_quantize step
    methods: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. a damping that had to be raised

    def to(self, device: torch.device | str) -> None:
        """Move the record's tensors (mask, codes, scales, GGML blocks) to `device`, in place."""
        if self.mask is not None:
            self.mask = self.mask.to(device)
        if self.quant is not None:
            q = self.quant
            self.quant = replace(q, q=q.q.to(device), scale=q.scale.to(device),
                                 zero=q.zero.to(device) if q.zero is not None else None)
        if self.ggml is not None:
            self.ggml = replace(self.ggml, blocks=self.ggml.blocks.to(device))


@dataclass
class ModelState:
    """The model as the steps leave it, and what they did to it."""

    model: nn.Module
    adapter: ArchitectureAdapter
    records: dict[str, LayerRecord] = field(default_factory=dict)
    teacher: nn.Module | None = None  # the model before the recipe, for training steps
    hidden_projection: torch.Tensor | None = None  # [teacher width, student width] when they differ
    details: list[dict] = field(default_factory=list)  # what structural / training steps did
    engine_reports: list = field(default_factory=list)  # timings of each calibrated pass

    def record_for(self, name: str, module: nn.Module) -> LayerRecord:
        """The record of `module` (named `name`), made on first use."""
        if name not in self.records:
            w = module.weight
            self.records[name] = LayerRecord(name, self.adapter.tensor_kind(name + ".weight"), tuple(w.shape),
                                             w.element_size())
        return self.records[name]


@dataclass
class RunResources:
    """What the run provides to steps: data, scratch places, progress, policies."""

    progress: Progress = field(default_factory=NoProgress)
    calibration: Callable[[], torch.Tensor] | None = None  # lazily drawn windows
    offload_dir: str | None = None  # keep calibration activations on disk
    tokenizer: object | None = None
    split: object | None = None  # the text split training data comes from
    runs_dir: str | None = None  # where training runs keep checkpoints
    restart_training: bool = False  # discard interrupted training runs instead of resuming them
    blocks: object | None = None  # a calibration.engine.BlockAccess when blocks live in files (streamed runs)
    device: str = "cpu"  # where calibrated steps work on each block (slimkit.devices.resolve_device)
    # the bytes a GGUF of the model spends outside its tensors' data (header, tokenizer): the export
    # package knows them, and the compress stage hands them to gguf_allocate's size budgets
    file_overhead: Callable[[nn.Module], int] | None = None
    # llama.cpp's decode cost of each GGML type on this machine (benchmarks/decode_costs.py), for
    # gguf_allocate's time budget: given the candidate types, measured once per machine and model
    decode_costs: Callable[[list[str]], object] | None = None


@dataclass
class StepContext:
    state: ModelState
    run: RunResources
