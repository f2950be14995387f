"""Write a packed model directory from a compress output, or from any model in one format."""

from __future__ import annotations

import json
from pathlib import Path

from slimkit.errors import SlimkitError
from slimkit.evaluation.size import files_bytes
from slimkit.formats import pack_model, save_packed
from slimkit.formats.embedding import pack_embeddings
from slimkit.formats.pack import AUTO
from slimkit.io.outputs import output_directory
from slimkit.models.loading import load_model
from slimkit.models.zoo import zoo_entry
from slimkit.paths import PackedDir
from slimkit.progress import NoProgress, Progress
from slimkit.recipes.state import COMPRESSION_FILE, load_compression_state, quantized_layers

FOUR_BIT = ("int4", "nf4")


def pack_to_dir(source: str, output: str | Path, fmt: str = AUTO, group_size: int = 64, overwrite: bool = False,
                progress: Progress = NoProgress(), include_lm_head: bool = True) -> dict:
    """auto: the formats a `slimkit compress` output recorded (and the head in int8 when the recipe
    quantized the blocks but not the head); else quantize every block linear (and the LM head,
    unless told not to; in int8 when `fmt` has 4 bits) round-to-nearest into `fmt`. An embedding
    tied to an int8 head reads its rows from the head's codes (`formats/embedding.py`).
    Returns a summary with sizes per layer. (`streaming.pack` does the same one block at a time.)"""
    loaded = load_model(source)
    records = None
    state = check_pack_source(source, Path(loaded.source), fmt)
    if state is not None:
        records = load_compression_state(state, loaded.model)
    parameters = sum(p.numel() for p in loaded.model.parameters())  # before packing: the model's own count
    linears, head = pack_plan(loaded.adapter, loaded.model, fmt, include_lm_head, state)
    body = {n: m for n, m in linears.items() if n != head}
    packed = pack_model(loaded.model, body, records, fmt, group_size, progress)
    if head is not None:  # 4 bits on the LM head costs far more quality than it saves: int8 there
        packed.update(pack_model(loaded.model, {head: linears[head]}, None, "int8"))
    if records:  # an untied embedding a quantize_outer step typed: its own blocks
        packed.update({n: e.table for n, e in pack_embeddings(loaded.model, records).items()})
    layers = {n: layer_summary(m) for n, m in packed.items()}
    output = Path(output)
    with output_directory(output, overwrite, inputs=[source], command="pack") as tmp:
        save_packed(loaded.model, loaded.tokenizer, tmp)
        return write_pack_summary(source, fmt, linears, layers, tmp, parameters)


def check_pack_source(source: str, directory: Path, fmt: str) -> Path | None:
    """The compression state `auto` packs from (None for an explicit format), or a clear refusal."""
    if fmt != AUTO:
        return None
    state = directory / COMPRESSION_FILE if directory.is_dir() else None
    if state is None or not state.is_file():
        raise SlimkitError(f"{source} is not a `slimkit compress` output (no {COMPRESSION_FILE}): "
                           "choose a format with --format (int8, w8a8, int4, nf4, fp8, sparse, 2:4)")
    return state


def pack_plan(adapter, model, fmt: str, include_lm_head: bool, state: Path | None = None) -> tuple[dict, str | None]:
    """The linears to pack, and the head when it is packed in int8 rather than as the others: under
    a 4-bit `fmt`, or from a compress output (`auto`, its `state` file) that quantized the blocks but
    left the head dense (one code and one scale per row: a tied embedding then reads its rows from
    it, so the file holds that matrix once, in int8)."""
    if fmt != AUTO:
        linears = adapter.linears(model, include_lm_head=include_lm_head)
        return linears, adapter.lm_head if fmt in FOUR_BIT and adapter.lm_head in linears else None
    coded = quantized_layers(state) if state is not None else set()
    int8_head = include_lm_head and bool(coded) and adapter.lm_head not in coded
    linears = adapter.linears(model, include_lm_head=include_lm_head and (int8_head or adapter.lm_head in coded))
    return linears, adapter.lm_head if int8_head and adapter.lm_head in linears else None


def layer_summary(m) -> dict:
    return {"format": m.format, **({"ggml_type": m.meta["ggml_type"]} if m.format == "ggml" else {}),
            "shape": [m.out_features, m.in_features], "disk_bytes": m.disk_bytes(),
            "ram_bytes": m.ram_bytes(), "bytes_per_weight": m.disk_bytes() / (m.out_features * m.in_features),
            "path_batch_1": m.path_for(1), "path_batch_128": m.path_for(128)}


def write_pack_summary(source: str, fmt: str, linears: dict, layers: dict, directory: Path, parameters: int) -> dict:
    """summary.json of a packed dir: what was packed (linears, and an embedding packed on its own),
    what stayed dense, the bytes before and after."""
    if not layers:
        raise SlimkitError(f"nothing to pack in {source}: no layer was quantized or pruned")
    left_dense = sorted(set(linears) - set(layers))
    summary = {
        "source": source if zoo_entry(source) else str(Path(source).absolute()),  # found again from any cwd
        "format": fmt, "packed_layers": len(layers), "left_dense": left_dense,
        "linears_dense_bytes": sum(m.weight.numel() * m.weight.element_size() for m in linears.values()),
        "linears_packed_bytes": sum(v["disk_bytes"] for n, v in layers.items() if n in linears) + sum(
            linears[n].weight.numel() * linears[n].weight.element_size() for n in left_dense),
        "file_bytes": files_bytes(directory), "layers": layers,
    }
    summary["parameters"] = parameters
    summary["file_bits_per_weight"] = summary["file_bytes"] * 8 / parameters  # the whole file, embeddings included
    PackedDir(directory).summary.write_text(json.dumps(summary, indent=2))
    return summary
