"""Checks on a checkpoint before and after it loads: nothing executed, nothing invented, nothing cast.

Before loading (headers only, no weights read): the config parses, names a model transformers
builds without code from the directory, and the safetensors files hold at least the parameters
that config describes, in floating-point dtypes. This catches a config whose sizes do not match
its files before gigabytes are allocated for it.
After loading: every parameter came from the files (none randomly initialised), shapes matched,
and every weight is finite.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from slimkit.errors import ModelNotFoundError, SlimkitError, WeightsError
from slimkit.io.text import read_text
from slimkit.models.config_bounds import check_config_bounds

log = logging.getLogger(__name__)

FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
NO_CODE = dict(trust_remote_code=False, local_files_only=True)  # every transformers call slimkit makes


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(read_text(config_file))
    except json.JSONDecodeError as exc:
        raise SlimkitError(f"{config_file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise SlimkitError(f"{config_file} must hold a JSON object")
    return config


def load_config(path: Path):
    """The transformers config, never running code from the directory (`auto_map` is ignored)."""
    from transformers import AutoConfig

    raw = read_config(path)
    check_config_bounds(raw, sum(f.stat().st_size for f in path.glob("*.safetensors")) or None)
    if raw.get("auto_map"):
        log.warning("%s: ignoring auto_map (slimkit never runs Python code from a model directory)", path)
    try:
        return AutoConfig.from_pretrained(str(path), **NO_CODE)
    except ValueError as exc:
        if "custom code" in str(exc) or "trust_remote_code" in str(exc) or raw.get("auto_map"):
            raise SlimkitError(f"{path} needs its own Python code to load (model_type "
                               f"'{raw.get('model_type')}'); slimkit never runs code from a model directory") from None
        raise SlimkitError(f"{path}/config.json is not a config transformers knows: {str(exc).splitlines()[0]}") from None
    except (TypeError, KeyError, AttributeError) as exc:
        raise SlimkitError(f"{path}/config.json is invalid: {type(exc).__name__}: {exc}") from None


@dataclass
class FileTensors:
    """What the safetensors headers of a model directory say, without reading any weight."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def main_dtype(self) -> torch.dtype | None:
        by_dtype: dict[str, int] = {}
        for name, dtype in self.dtypes.items():
            if dtype in FLOAT_DTYPES:
                by_dtype[dtype] = by_dtype.get(dtype, 0) + math.prod(self.shapes[name])
        return FLOAT_DTYPES[max(by_dtype, key=by_dtype.get)] if by_dtype else None


def read_headers(files: list[Path]) -> FileTensors:
    found = FileTensors()
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    found.shapes[key] = tuple(sl.get_shape())
                    found.dtypes[key] = sl.get_dtype()
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{file} is corrupt or truncated: {str(exc).splitlines()[0][:200]}") from None
    return found


def model_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    return [f for f in files if f.name.startswith("model")] or files


def meta_model(config, kind: str) -> nn.Module:
    """The model `config` describes, built on the meta device: every shape, no memory."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    try:
        with torch.device("meta"):
            return auto.from_config(config, trust_remote_code=False)
    except (ValueError, TypeError, RuntimeError, AttributeError, KeyError) as exc:
        raise SlimkitError(f"transformers cannot build a model from this config: {str(exc).splitlines()[0]}") from None


def unique_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() skips tied duplicates


def check_before_load(path: Path, kind: str) -> FileTensors:
    """Config vs files, from headers only. Returns what the files hold."""
    config = load_config(path)
    return check_files(path, config, meta_model(config, kind))


def check_files(path: Path, config, skeleton: nn.Module) -> FileTensors:
    """The safetensors headers of `path` against the model `config` describes (`skeleton`)."""
    files = model_files(path)
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        raise WeightsError(f"{path} holds no .safetensors weights" + (
            f" (only {', '.join(bins[:3])}: slimkit never unpickles; convert them to safetensors first)" if bins else ""))
    held = read_headers(files)
    bad = [f"{k} ({d})" for k, d in held.dtypes.items() if d not in FLOAT_DTYPES and k.endswith((".weight", ".bias"))]
    if bad:
        raise WeightsError(f"{path}: weights stored in a non-floating dtype: {', '.join(bad[:4])}"
                           f"{' ...' if len(bad) > 4 else ''}; slimkit will not cast them silently")
    expected = unique_parameter_count(skeleton)
    if expected > held.numel:
        raise WeightsError(
            f"{path}: config.json describes {expected:,} parameters but the weight files hold only "
            f"{held.numel:,} values: config and weights disagree (a wrong config, or missing tensors)")
    declared = getattr(config, "dtype", None)
    main = held.main_dtype()
    if isinstance(declared, torch.dtype) and main is not None and declared != main:
        log.warning("%s: config.json says %s but the weights are stored in %s; using the stored dtype",
                    path, declared, main)
    return held


def check_loading_info(path: Path, info: dict) -> None:
    """transformers' own report of the load: nothing may be missing or mismatched."""
    missing = list(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing:
        raise WeightsError(f"{path}: tensors missing from the checkpoint: {', '.join(map(str, missing[:5]))}"
                           f"{' ...' if len(missing) > 5 else ''}; slimkit will not initialise them randomly")
    if mismatched:
        raise WeightsError(f"{path}: tensors whose shapes differ from config.json: {mismatched[:3]}")


def check_finite(model: nn.Module, where: str) -> None:
    """Every floating parameter and buffer finite, or a WeightsError naming the first bad ones."""
    bad = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t.float()).all()):
            bad.append(f"{name} ({int((~torch.isfinite(t.float())).sum())} NaN/Inf)")
    if bad:
        raise WeightsError(f"{where} has non-finite weights: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; "
                           "slimkit will not evaluate or compress a model with NaN/Inf weights")


def check_gguf(path: Path) -> None:
    """A GGUF must hold tensors: transformers would otherwise build the architecture's default
    config with random weights. Reads the header and tensor index only (memory-mapped)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        count = sum(int(t.n_elements) for t in reader.tensors)
    except Exception as exc:  # the reader raises struct, value and index errors on damage
        raise WeightsError(f"could not read GGUF file {path} (corrupt or truncated): {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
    if count == 0:
        raise WeightsError(f"GGUF file {path} holds no tensors (header only); nothing to load")


def is_causal_lm(architectures: list[str]) -> bool:
    """Whether config.json's architectures name a causal LM (`...ForCausalLM`, or one transformers maps
    as such under another name, like GPT2LMHeadModel)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    known = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    return any(a.endswith("ForCausalLM") or a in known for a in architectures)


POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")
# model types whose position ids start after the padding token's (RoBERTa's embeddings)
POSITIONS_AFTER_PADDING = ("roberta", "camembert", "data2vec-text", "xlm-roberta", "xlm-roberta-xl",
                           "roberta-prelayernorm", "xmod")


def usable_positions(config) -> int | None:
    """How many tokens one window of the model may hold, from its config; None when it does not say."""
    value = next((v for k in POSITION_FIELDS if isinstance(v := getattr(config, k, None), int) and v > 0), None)
    if value is not None and getattr(config, "model_type", "") in POSITIONS_AFTER_PADDING:
        value -= int(getattr(config, "pad_token_id", None) or 0) + 1
    return value


def ppl_seqlen(config, default: int = 512) -> int:
    """The protocol's 512-token windows, cut to a model with fewer positions (a tiny GPT-2 has 256)."""
    limit = usable_positions(config)
    return min(default, limit) if limit else default
