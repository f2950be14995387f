"""Training checkpoints without pickle: tensors in safetensors, everything else as JSON.

One file, `checkpoint.safetensors`, written atomically: the modules' and optimizer's tensors and
the torch RNG state as tensors, and a JSON header (`slimkit_checkpoint`) with the step, the
optimizer's param groups and scalar state, the scheduler's state and the Python / numpy RNG
states. Loading a planted or damaged file can fail, but never runs code.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from slimkit.errors import CheckpointError
from slimkit.io.tensors import save_tensors_atomic, unique_tensors

VERSION = 1


def _rng_state(tensors: dict[str, torch.Tensor]) -> dict:
    tensors["rng/torch"] = torch.get_rng_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover
        pass
    return state


def _set_rng_state(state: dict, tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _split_optimizer(opt_state: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """Tensors of the optimizer's per-parameter state go to `tensors`; the rest stays JSON."""
    scalars: dict[str, dict] = {}
    for pid, entry in opt_state["state"].items():
        scalars[str(pid)] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{pid}/{key}"] = value.detach().contiguous()
            else:
                scalars[str(pid)][key] = value
    return {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _join_optimizer(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state: dict[int, dict] = {int(pid): dict(values) for pid, values in meta["scalars"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: Path, modules: dict[str, nn.Module], opt: torch.optim.Optimizer, sched, step: int) -> None:
    kept, aliases = unique_tensors((f"modules/{name}/{key}", value) for name, module in modules.items()
                                   for key, value in module.state_dict().items())  # tied weights once
    tensors = {k: v.detach().contiguous() for k, v in kept.items()}
    meta = {"version": VERSION, "step": step, "optimizer": _split_optimizer(opt.state_dict(), tensors),
            "scheduler": sched.state_dict(), "rng": _rng_state(tensors), "aliases": aliases}
    save_tensors_atomic(tensors, path, metadata={"slimkit_checkpoint": json.dumps(meta)})


def load_checkpoint(path: Path, modules: dict[str, nn.Module], opt: torch.optim.Optimizer, sched) -> int:
    """Restore everything `save_checkpoint` wrote; returns the step. Damage -> CheckpointError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["slimkit_checkpoint"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("version") != VERSION:
            raise ValueError(f"checkpoint version {meta.get('version')}, expected {VERSION}")
        tensors.update({alias: tensors[target] for alias, target in meta["aliases"].items()})
        for name, module in modules.items():
            prefix = f"modules/{name}/"
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        opt.load_state_dict(_join_optimizer(meta["optimizer"], tensors))
        sched.load_state_dict(meta["scheduler"])
        _set_rng_state(meta["rng"], tensors)
        return int(meta["step"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"cannot resume the run in {path.parent}: its checkpoint is damaged or not slimkit's "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}). "
            "Run again with --restart to start this training run from step 0.") from None
