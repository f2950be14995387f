"""`slimkit export`: hand a compressed model to the runtimes people deploy with, and check it there.

--to hf                  plain dense transformers model (masks applied, codes dequantized)
--to compressed-tensors  vLLM's format (pack-quantized int4/int8, int-quantized W8A8)
--to gguf                llama.cpp (K-quants, Q4_0/Q4_1/Q8_0 codes kept bit for bit, or a file type's
                         per-tensor mix; tokenizer included)

The source is a `slimkit compress` output, a `slimkit pack` output, or any model. With
verification on, the export is loaded back by the other library (transformers, its
compressed-tensors or GGUF loader) and its perplexity compared with slimkit's own evaluation
of the same model, on the same windows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimkit.errors import SlimkitError
from slimkit.formats import pack_model, packed_layers
from slimkit.formats.embedding import dense_embeddings
from slimkit.io.outputs import output_directory
from slimkit.io.text import read_text
from slimkit.models.checks import NO_CODE, is_causal_lm
from slimkit.models.layouts import checkpoint_layout, is_conv1d
from slimkit.models.loading import LoadedModel, load_model, require_tokenizer
from slimkit.models.zoo import zoo_entry
from slimkit.paths import ExportDir, ModelDir, PackedDir
from slimkit.progress import NoProgress, Progress
from slimkit.recipes.state import COMPRESSION_FILE, load_compression_state
from slimkit.results import CompressReport

TARGETS = ("hf", "compressed-tensors", "gguf")
GGUF_NAME = ExportDir.GGUF


def _with_formats(loaded: LoadedModel) -> dict:
    """A compress output holds fake-quantized dense weights: pack them in memory (auto). Returns
    the llama.cpp blocks recorded for tensors that stay dense (a gguf_quantize embedding)."""
    state = Path(loaded.source) / COMPRESSION_FILE if Path(loaded.source).is_dir() else None
    if packed_layers(loaded.model) or state is None or not state.is_file():
        return {}
    records = load_compression_state(state, loaded.model)
    packed = pack_model(loaded.model, loaded.adapter.linears(loaded.model, include_lm_head=True), records)
    return {n: r.ggml for n, r in records.items() if r.ggml is not None and n not in packed}


def unpack(model: nn.Module) -> nn.Module:
    """Packed linears back to nn.Linear with their dequantized weights."""
    for name, mod in packed_layers(model).items():
        dense = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        dense.weight.data = mod.dequantize()
        if mod.bias is not None:
            dense.bias.data = mod.bias.detach().clone()
        model.set_submodule(name, dense)
        if mod.meta.get("tied_to") or name == "lm_head":
            model.config.tie_word_embeddings = False
    return model


def _parents(here: Path) -> list[str]:
    if PackedDir(here).summary.is_file():
        return [json.loads(read_text(PackedDir(here).summary)).get("source") or ""]
    if ModelDir(here).report_json.is_file():
        model = CompressReport.read(ModelDir(here).report_json).model
        return [model.name, model.source]
    return []


def ancestors(source: str, hops: int = 4) -> list[str]:
    """`source`, the model it was made from, and so on: a pack output names its source in
    pack.json, a compress output names its model (zoo name and path) in report.json."""
    chain = [source]
    for here in chain:
        if len(chain) > hops:
            break
        try:
            parents = _parents(Path(here))
        except (SlimkitError, ValueError, AttributeError):  # a damaged record ends the trail
            break  # (the tokenizer is then built from HF and its pre-tokenizer checked by hash)
        chain += [p for p in parents if p and p not in chain]
    return chain


def _as_path(name: str) -> Path:
    entry = zoo_entry(name)
    return entry.locate() if entry is not None else Path(name)


def lineage_sources(loaded: LoadedModel) -> tuple[Path | None, Path | None]:
    """(the GGUF the model came from, if any: its tokenizer and description are copied exactly;
    the first Hugging Face dir on the way, for the model card)."""
    paths = [_as_path(p) for p in ancestors(str(loaded.source)) + [loaded.name]]
    gguf_file = next((p for p in paths if p.suffix == ".gguf" and p.is_file()), None)
    hf_dir = next((p for p in paths if (p / "config.json").is_file()), None)
    return gguf_file, hf_dir


@dataclass(frozen=True)
class ExportSettings:
    """How an export runs: the GGUF type, whether an existing output may be replaced, and the check
    (the export loaded by transformers alone, its perplexity against slimkit's on `windows`)."""

    gguf_type: str = "auto"
    overwrite: bool = False
    verify: bool = True
    windows: int | None = 16


def _refusals_first(loaded, to: str, lineage, verify: bool) -> None:
    """What would make the export fail, before the reference perplexity is spent."""
    if to == "gguf":
        from slimkit.export.gguf import check_gguf_export

        if lineage[0] is None:
            require_tokenizer(loaded, "GGUF export")
        check_gguf_export(loaded.model, loaded.tokenizer, lineage[0])
    if to == "compressed-tensors":
        from slimkit.export.compressed_tensors import export_plan, unloadable_in_transformers

        asymmetric = unloadable_in_transformers(export_plan(loaded.model)[3])
        if verify and asymmetric:
            raise SlimkitError(f"{len(asymmetric)} layers ({asymmetric[0]}, ...) have asymmetric codes, whose zero "
                               "points compressed-tensors packs; this transformers cannot load those, so the export "
                               "cannot be checked in it. Export with --no-verify (the file is laid out as "
                               "llm-compressor writes it, for vLLM), or quantize symmetric.")
    if verify and loaded.kind == "causal-lm":
        require_tokenizer(loaded, "the export check (--verify: perplexity before and after)")


def _write(loaded, to: str, tmp: Path, settings: ExportSettings, lineage, dense_blocks: dict) -> dict:
    """The export into `tmp`; what it wrote, for export.json."""
    if to == "hf":
        model = unpack(loaded.model)
        with checkpoint_layout(model):
            model.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        return {}
    if to == "compressed-tensors":
        from slimkit.export.compressed_tensors import export_compressed_tensors

        all_linears = list(loaded.adapter.linears(loaded.model, include_lm_head=True))
        return export_compressed_tensors(loaded.model, loaded.tokenizer, tmp, all_linears)
    from slimkit.export.gguf import export_gguf

    written = export_gguf(loaded.model, loaded.tokenizer, tmp / GGUF_NAME, settings.gguf_type, *lineage,
                          dense_blocks=dense_blocks)
    return {"tensors_by_type": written.tensors_by_type, "bytes": written.bytes, "parameters": written.parameters,
            "bits_per_weight": written.bits_per_weight}


def export_model(source: str, output: str | Path, to: str, settings: ExportSettings = ExportSettings(),
                 progress: Progress = NoProgress()) -> dict:
    if to not in TARGETS:
        raise SlimkitError(f"unknown export target '{to}'; choose one of {', '.join(TARGETS)}")
    loaded = load_model(source)
    dense_embeddings(loaded.model, keep_head_packed=to == "gguf")  # an embedding read from its int8 head: plain
    dense_blocks = _with_formats(loaded)
    lineage = lineage_sources(loaded) if to == "gguf" else (None, None)
    _refusals_first(loaded, to, lineage, settings.verify)
    verify = settings.verify and loaded.kind == "causal-lm"
    own_ppl = _ppl(loaded.model, loaded.tokenizer, settings.windows, progress, "ppl (slimkit)") if verify else None
    output = Path(output)
    result = {"source": source, "to": to, "formats": sorted({m.format for m in packed_layers(loaded.model).values()}),
              "output": str(output)}
    with output_directory(output, settings.overwrite, inputs=[source], command="export") as tmp:
        progress.note(f"writing the {to} export")
        result.update(_write(loaded, to, tmp, settings, lineage, dense_blocks))
        if own_ppl is not None:  # checked before the rename: the export.json written states the check
            result["verify"] = verify_export(tmp, to, loaded.tokenizer, own_ppl, settings.windows, progress)
        ExportDir(tmp).summary.write_text(json.dumps(result, indent=2))
    return result


def _ppl(model, tokenizer, windows: int | None, progress: Progress = NoProgress(), label: str = "perplexity") -> float:
    from slimkit.data import load_split
    from slimkit.evaluation import PerplexityProtocol, perplexity
    from slimkit.models.checks import ppl_seqlen

    return perplexity(model, tokenizer, load_split(), PerplexityProtocol(ppl_seqlen(model.config), windows),
                      progress, label).ppl


def load_exported(output: Path, to: str, dequantize: bool = False) -> nn.Module:
    """The export, loaded by transformers alone (no slimkit code in the model). `dequantize`: a
    compressed-tensors model decompressed at load, for architectures whose weight init in
    transformers reads `.weight` of every linear (Falcon, ModernBERT) and so fails on packed ones
    (tried compressed first, then so); always so for a model holding Conv1D layers (GPT-2), which
    transformers runs compressed never."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, CompressedTensorsConfig

    if to == "gguf":
        return AutoModelForCausalLM.from_pretrained(str(output), gguf_file=GGUF_NAME, dtype=torch.float32,
                                                    **NO_CODE).eval()
    archs = json.loads((output / "config.json").read_text()).get("architectures") or []
    auto = AutoModelForCausalLM if is_causal_lm(archs) else AutoModel
    if not dequantize:
        config = AutoConfig.from_pretrained(str(output), **NO_CODE)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            dequantize = any(is_conv1d(m) for m in auto.from_config(config).modules())
    if not dequantize:
        try:
            return auto.from_pretrained(str(output), dtype=torch.float32, **NO_CODE).eval()
        except AttributeError as exc:  # a weight init reading `.weight` of a packed linear (Falcon's FalconLinear)
            if "attribute 'weight'" not in str(exc):
                raise
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    return auto.from_pretrained(str(output), dtype=torch.float32, **extra, **NO_CODE).eval()


def verify_export(output: Path, to: str, tokenizer, own_ppl: float, windows: int | None,
                  progress: Progress = NoProgress()) -> dict:
    progress.note(f"check: loading the {to} export in transformers")
    model = load_exported(output, to)
    theirs = _ppl(model, tokenizer, windows, progress, "ppl (the export, in transformers)")
    check = {"loaded_by": "transformers" + (" (gguf_file)" if to == "gguf" else ""), "their_ppl": theirs,
             "slimkit_ppl": own_ppl, "relative_diff": theirs / own_ppl - 1, "windows": windows}
    if to == "gguf":
        from transformers import AutoTokenizer

        gguf_tok = AutoTokenizer.from_pretrained(str(output), gguf_file=GGUF_NAME, **NO_CODE)
        text = "Compression only counts when the hardware can use it: 2:4 sparsity, int4, GGUF."
        check["tokenizer_matches"] = gguf_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    return check
