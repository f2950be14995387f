"""A streamed run's progress on disk: the blocks done (weights and records, one file each), what
they measured, and the calibration inputs of the next block; enough for a killed run, started
again with the same arguments, to go on at the block where it stopped.

Order of writes after block k: its weights, its records, the next block's inputs, then
`state.json` (atomic) saying k + 1. A kill before the state is written redoes block k.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from slimkit.io.outputs import write_text_atomic
from slimkit.io.tensors import save_tensors_atomic
from slimkit.paths import StreamWork


def run_identity(**parts) -> str:
    """A digest of everything the result depends on: a run resumes only into the same identity."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class StreamState:
    identity: str
    next_block: int = 0
    tally: dict = field(default_factory=lambda: {"rows": [], "zeros": 0, "total": 0, "packed_delta": 0})
    baseline_zeros: int = 0  # zero weights in the blocks' linears before compression
    baseline_total: int = 0
    seconds: float = 0.0  # compression time so far, over every session of the run
    resumed_at: list[int] = field(default_factory=list)  # blocks where a session started again
    phase_seconds: dict = field(default_factory=dict)  # read / per-tensor steps / write, over every session

    def add_time(self, phase: str, seconds: float) -> None:
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + seconds


class WorkDir:
    def __init__(self, layout: StreamWork, identity: str, log: Callable[[str], None] = lambda m: None):
        self.layout, self.identity, self.log = layout, identity, log

    def start(self) -> StreamState:
        """The state to go on from: the saved one for this identity, else a fresh start."""
        saved = self._read_state()
        if saved is not None and saved.identity == self.identity and saved.next_block > 0:
            saved.resumed_at.append(saved.next_block)
            self.log(f"resuming at block {saved.next_block} (blocks 0-{saved.next_block - 1} were done by an "
                     f"earlier run with the same arguments; {self.layout.root})")
            return saved
        if self.layout.root.exists():
            self.log(f"discarding an earlier streamed run with other arguments in {self.layout.root}")
            shutil.rmtree(self.layout.root)
        for sub in ("blocks", "records"):
            (self.layout.root / sub).mkdir(parents=True, exist_ok=True)
        state = StreamState(self.identity)
        self.save_state(state)
        return state

    def _read_state(self) -> StreamState | None:
        try:
            return StreamState(**json.loads(self.layout.state.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def save_state(self, state: StreamState) -> None:
        write_text_atomic(self.layout.state, json.dumps(asdict(state)))

    def save_activations(self, tensors: list[torch.Tensor], dense: list[torch.Tensor] = ()) -> None:
        """The next block's inputs (and the dense model's, when the pass carries them)."""
        named = {f"{i}": t for i, t in enumerate(tensors)} | {f"dense.{i}": t for i, t in enumerate(dense)}
        save_tensors_atomic(named, self.layout.activations)

    def load_activations(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        from slimkit.errors import CheckpointError

        try:
            with safe_open(str(self.layout.activations), framework="pt") as f:
                keys = set(f.keys())
                count = sum(1 for k in keys if not k.startswith("dense."))
                dense = [f.get_tensor(f"dense.{i}") for i in range(len(keys) - count)]
                return [f.get_tensor(f"{i}") for i in range(count)], dense
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{self.layout.activations} cannot be read ({exc}); delete "
                                  f"{self.layout.root} to start the streamed run again") from None

    def remove(self) -> None:
        shutil.rmtree(self.layout.root, ignore_errors=True)
        parent = self.layout.root.parent
        if parent.exists() and not any(parent.iterdir()):
            parent.rmdir()
