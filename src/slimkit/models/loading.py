"""Loading models: zoo names, local HF directories and GGUF files. Never downloads.

A GGUF file is dequantized once by transformers (~20-35 s) and cached as fp32 safetensors under
the user cache dir (`SLIMKIT_CACHE` overrides it); later loads read the cache in seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from torch import nn

from slimkit.errors import DataError, ModelNotFoundError, OutputInUseError, OutputRefusedError, WeightsError
from slimkit.io.outputs import output_directory
from slimkit.models.adapters import ArchitectureAdapter, adapter_for
from slimkit.models.checks import (
    NO_CODE,
    check_before_load,
    check_finite,
    check_gguf,
    check_loading_info,
    is_causal_lm,
    read_config,
)
from slimkit.models.layouts import as_linears
from slimkit.models.zoo import ZOO, ModelKind, zoo_entry
from slimkit.paths import cache_root

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # slimkit never downloads at run time
log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# A directory in one of slimkit's own stored forms is read by the package that defines the form,
# keyed by the file that marks it: `formats` registers the packed-model reader when it is
# imported (and `import slimkit` imports it), so that `models` never imports `formats`.
DirectoryReader = Callable[[Path, torch.dtype], nn.Module]
_DIRECTORY_READERS: dict[str, DirectoryReader] = {}


def register_directory_reader(marker_file: str, read: DirectoryReader) -> None:
    _DIRECTORY_READERS[marker_file] = read


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any | None
    adapter: ArchitectureAdapter
    kind: ModelKind
    name: str  # what the user asked for
    source: Path  # where the weights came from
    load_seconds: float
    from_cache: bool = False
    hf_dir: Path | None = None  # an HF directory holding these weights (for a GGUF: the cache)
    source_dtype: torch.dtype = torch.float32  # what the checkpoint stores; compute runs in `model`'s dtype


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def model_kind(config: dict) -> ModelKind:
    return "causal-lm" if is_causal_lm(config.get("architectures") or []) else "encoder"


_TOKENIZER_PROBLEMS: dict[str, str] = {}  # where a tokenizer was refused in this process -> why


def _tokenizer_refusal(path: Path, gguf_file: str | None, exc: Exception) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    config = path / "tokenizer_config.json"
    custom = "custom code" in str(exc) or "trust_remote_code" in str(exc) or (
        config.is_file() and '"auto_map"' in config.read_text(encoding="utf-8", errors="replace"))
    if custom:
        return "its tokenizer needs its own Python code (auto_map), and slimkit never runs code from a model directory"
    if gguf_file:
        return f"{gguf_file} holds no tokenizer transformers can read (tokenizer.ggml.* metadata): {text}"
    if not any(path.glob("tokenizer*")) and not any(path.glob("vocab*")):
        return "the directory holds no tokenizer files (tokenizer.json, tokenizer_config.json, ...)"
    return f"transformers could not load its tokenizer: {text}"


def _load_tokenizer(path: Path, **kwargs) -> Any | None:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), **NO_CODE, **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        why = _tokenizer_refusal(path, kwargs.get("gguf_file"), exc)
        _TOKENIZER_PROBLEMS[str(path / kwargs.get("gguf_file", ""))] = why
        log.warning("no tokenizer loaded from %s: %s; text evaluation will be unavailable", path, why)
        return None


def require_tokenizer(model: Any, what: str) -> None:
    """A clear error, saying why, when `what` needs the tokenizer of `model` (a `LoadedModel` or a
    `StreamedModel`: its `tokenizer` and `source`)."""
    if model.tokenizer is None:
        places = [model.source, getattr(model, "hf_dir", None)]
        fallback = ("the GGUF file holds no tokenizer metadata transformers can read" if
                    Path(model.source).suffix == ".gguf" else "the directory holds no tokenizer files")
        why = next((_TOKENIZER_PROBLEMS[str(p)] for p in places if str(p) in _TOKENIZER_PROBLEMS), fallback)
        raise DataError(f"{what} needs the tokenizer, and {model.source} has none usable: {why}")


def _load_hf_dir(path: Path, dtype: torch.dtype) -> tuple[nn.Module, Any, ModelKind, torch.dtype]:
    """(model, tokenizer, kind, the dtype the weights are stored in). Safetensors only."""
    from transformers import AutoModel, AutoModelForCausalLM

    kind = model_kind(read_config(path))
    for marker, read in _DIRECTORY_READERS.items():
        if (path / marker).is_file():  # e.g. a slimkit packed model: formats swapped in at load
            model = read(path, dtype)
            check_finite(model, str(path))
            return model, _load_tokenizer(path), kind, dtype
    held = check_before_load(path, kind)
    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    try:
        # safetensors only: nothing is unpickled (a pytorch_model.bin is refused, not loaded)
        model, info = auto.from_pretrained(str(path), dtype=dtype, use_safetensors=True, output_loading_info=True,
                                           **NO_CODE)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise WeightsError(f"could not load the model in {path} (corrupt, truncated, or shapes that disagree "
                           f"with config.json): {str(exc).splitlines()[0][:300]}") from None
    check_loading_info(path, info)
    check_finite(model, str(path))
    as_linears(model)  # MoE experts and Conv1D as nn.Linear (models/layouts.py)
    return model.eval(), _load_tokenizer(path), kind, held.main_dtype() or dtype


def _drop_gguf_quantizer(model: nn.Module) -> None:
    # transformers refuses save_pretrained on a model "quantized with gguf"; the weights are
    # already dequantized to plain tensors, so the marker can go.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]


def gguf_cache_dir(path: Path) -> Path:
    return cache_root() / "gguf" / f"{path.stem}-{_file_digest(path)}"


def _read_gguf(path: Path) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM

    check_gguf(path)
    try:
        tokenizer = _load_tokenizer(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, **NO_CODE).eval()
    except MemoryError:
        raise
    except Exception as exc:  # the gguf reader raises anything from struct errors to KeyError
        raise WeightsError(f"could not read GGUF file {path} (corrupt, truncated, header only, or an "
                           f"architecture transformers cannot dequantize): {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
    check_finite(model, str(path))
    return model, tokenizer


def _load_gguf(path: Path, cache: Path, dtype: torch.dtype) -> tuple[nn.Module, Any, ModelKind, bool]:
    if (cache / "config.json").is_file():
        model, tokenizer, kind, _ = _load_hf_dir(cache, dtype)
        return model, tokenizer, kind, True
    log.info("dequantizing %s once; cached at %s", path.name, cache)
    model, tokenizer = _read_gguf(path)
    _drop_gguf_quantizer(model)
    try:
        with output_directory(cache, overwrite=True, command="gguf cache") as tmp:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    except (OutputInUseError, OutputRefusedError) as exc:  # another process is writing it: use ours
        log.info("not caching %s: %s", path.name, exc)
    return model.to(dtype), tokenizer, "causal-lm", False


def _looks_local(path: Path) -> bool:
    """A missing path that is plainly meant as a local one: absolute, ../, or inside a
    directory that exists here (`out/int4-typo`). Only the rest can be a Hub id."""
    return path.is_absolute() or str(path).startswith("../") or (
        len(path.parts) > 1 and Path(path.parts[0]).is_dir())


def _near_names(path: Path) -> str:
    import difflib

    parent = path.parent if path.parent.is_dir() else None
    names = sorted(p.name for p in parent.iterdir()) if parent else []
    close = difflib.get_close_matches(path.name, names, n=3)
    return f" (in {parent}: did you mean {', '.join(close)}?)" if close else ""


def resolve(name_or_path: str | os.PathLike) -> tuple[Path, ModelKind | None]:
    """Turn a zoo name, HF dir or .gguf path into a local path; never touches the network."""
    entry = zoo_entry(str(name_or_path))
    if entry is not None:
        return entry.locate(), entry.kind
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_dir() or path.suffix == ".gguf":
            return path, None
        raise ModelNotFoundError(f"{path} is neither a Hugging Face model directory nor a .gguf file")
    known = ", ".join(ZOO)
    if path.is_symlink():
        raise ModelNotFoundError(f"{path} is a symlink to {os.readlink(path)}, which does not exist")
    if _looks_local(path):
        raise ModelNotFoundError(f"no such file or directory: {path}" + _near_names(path))
    if _HUB_ID.match(str(name_or_path)):
        raise ModelNotFoundError(
            f"'{name_or_path}' looks like a Hugging Face Hub id. slimkit never downloads at run "
            f"time: download it yourself (e.g. `hf download {name_or_path} --local-dir DIR`) and "
            f"pass DIR, or use a packaged model: {known}"
        )
    raise ModelNotFoundError(
        f"unknown model '{name_or_path}': not a packaged model ({known}), and no such file or "
        "directory. Run `slimkit models` to list the packaged ones."
    )


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a zoo name, a local HF directory or a .gguf file, with its adapter."""
    start = time.perf_counter()
    path, _ = resolve(name_or_path)
    from_cache = False
    hf_dir = path
    if path.suffix == ".gguf":
        hf_dir = gguf_cache_dir(path)  # hashes the file once
        model, tokenizer, kind, from_cache = _load_gguf(path, hf_dir, dtype)
        source_dtype = torch.float32  # dequantized from the GGUF's blocks
    else:
        model, tokenizer, kind, source_dtype = _load_hf_dir(path, dtype)
    adapter = adapter_for(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        adapter=adapter,
        kind=kind,
        name=str(name_or_path),
        source=path,
        load_seconds=time.perf_counter() - start,
        from_cache=from_cache,
        hf_dir=hf_dir,
        source_dtype=source_dtype,
    )
