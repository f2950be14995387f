"""The model dir of a streamed run, assembled from its work files: one weight shard per block
(hard-linked, not copied), the embedding / norm / head shard(s) copied a slice of rows at a
time, the HF index, the merged
compression records, config, tokenizer and the reports."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from slimkit.evaluation.size import files_bytes
from slimkit.io.tensors import copy_tensors_sliced
from slimkit.models.streamed import StreamedModel
from slimkit.paths import ModelDir
from slimkit.recipes.schema import Recipe
from slimkit.recipes.state import merge_compression_states
from slimkit.reports.tables import report_markdown
from slimkit.results import CompressReport
from slimkit.streaming.work import WorkDir

OUTER_SHARD_BYTES = 1 << 30  # embedding / head tensors grouped into shards of about this size


def _outer_parts(streamed: StreamedModel, work: WorkDir, directory: Path, save_dtype: torch.dtype) -> list[Path]:
    """Files holding every tensor outside the blocks: the rewritten ones, and the rest copied from
    the checkpoint (read one group at a time)."""
    blocks = streamed.prefix(streamed.adapter.get_blocks(streamed.model))
    names = [n for n in streamed.shards.files if not n.startswith(blocks)]
    parts = []
    if work.layout.outer.is_file():
        parts.append(work.layout.outer)
        with safe_open(str(work.layout.outer), framework="pt") as f:
            done = set(f.keys())
        names = [n for n in names if n not in done]
    group: list[str] = []
    for i, name in enumerate(names):
        group.append(name)
        size = sum(math.prod(streamed.shards.shapes[n]) * save_dtype.itemsize for n in group)
        if size >= OUTER_SHARD_BYTES or i == len(names) - 1:
            part = directory / f".outer-{len(parts)}.safetensors"
            shards = streamed.shards
            copy_tensors_sliced(lambda n, a, b: shards.rows(n, a, b, save_dtype), {n: shards.shapes[n] for n in group},
                                part, save_dtype)
            parts.append(part)
            group = []
    return parts


def _place(part: Path, target: Path) -> None:
    """A work file into the output: a hard link when the file system allows, else a copy."""
    if part.parent == target.parent:
        os.replace(part, target)
        return
    try:
        os.link(part, target)
    except OSError:
        shutil.copyfile(part, target)


def write_weights(streamed: StreamedModel, work: WorkDir, directory: Path, save_dtype: torch.dtype) -> None:
    n = len(streamed.adapter.get_blocks(streamed.model))
    parts = [*_outer_parts(streamed, work, directory, save_dtype), *(work.layout.block_weights(k) for k in range(n))]
    weight_map, total = {}, 0
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        with safe_open(str(part), framework="pt") as f:
            for key in f.keys():
                weight_map[key] = name
                sl = f.get_slice(key)
                total += math.prod(sl.get_shape()) * save_dtype.itemsize
        _place(part, directory / name)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_streamed_output(streamed: StreamedModel, work: WorkDir, directory: Path, recipe: Recipe,
                          report: CompressReport, final: Path, save_dtype: torch.dtype) -> None:
    directory.mkdir(exist_ok=True)
    layout = ModelDir(directory)
    write_weights(streamed, work, directory, save_dtype)
    merge_compression_states(sorted((work.layout.root / "records").glob("*.safetensors")), layout.compression)
    config = copy.deepcopy(streamed.model.config)
    config.dtype = save_dtype
    config.save_pretrained(directory)
    generation = streamed.source / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, directory / generation.name)
    if streamed.tokenizer is not None:
        streamed.tokenizer.save_pretrained(directory)
    layout.recipe.write_text(recipe.to_yaml())
    report.size.stored_bytes = files_bytes(directory, ModelDir.WEIGHTS_GLOB)
    report.output = str(final)
    layout.report_json.write_text(json.dumps(report.to_dict(), indent=2))
    layout.report_md.write_text(report_markdown(report))

