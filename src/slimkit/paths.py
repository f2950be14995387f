"""Every file and folder slimkit writes, named in one place (in the spirit of open_lth's paths.py).

A layout is a frozen dataclass over a root directory; its properties are the paths inside it, and
its upper-case names are the bare file names (for code that needs a name, not a path). Code that
writes or reads an output asks its layout, never spells a file name itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def cache_root() -> Path:
    """slimkit's cache: $SLIMKIT_CACHE, else $XDG_CACHE_HOME/slimkit, else ~/.cache/slimkit."""
    env = os.environ.get("SLIMKIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "slimkit"


def _inside(name: str) -> property:
    """A property: `name` inside the layout's root."""
    return property(lambda self: self.root / name)


@dataclass(frozen=True)
class ModelDir:
    """One compressed model: a plain Hugging Face directory plus what compression kept."""

    root: Path

    WEIGHTS_GLOB = "model*.safetensors"
    COMPRESSION = "compression.safetensors"
    recipe = _inside("recipe.yaml")
    report_json = _inside("report.json")
    report_md = _inside("report.md")
    compression = _inside(COMPRESSION)
    training_curve = _inside("training_curve.png")
    allocation_plot = _inside("allocation.png")  # gguf_allocate: predicted KLD against size
    packed = _inside("packed")  # `compress --bench` packs here


@dataclass(frozen=True)
class CompressOutput:
    """`slimkit compress -o ROOT`: ROOT is the model dir for one recipe, else ROOT/<recipe>/ each,
    with a summary comparing them."""

    root: Path
    recipes: tuple[str, ...]

    def model_dir(self, recipe: str) -> ModelDir:
        return ModelDir(self.root if len(self.recipes) == 1 else self.root / recipe)

    summary_md = _inside("summary.md")
    summary_json = _inside("summary.json")
    bench_md = _inside("bench.md")


@dataclass(frozen=True)
class PackedDir:
    root: Path

    WEIGHTS = "packed.safetensors"
    weights = _inside(WEIGHTS)
    summary = _inside("pack.json")


@dataclass(frozen=True)
class ExportDir:
    root: Path

    GGUF = "model.gguf"
    WEIGHTS = "model.safetensors"  # compressed-tensors
    gguf = _inside(GGUF)
    summary = _inside("export.json")


@dataclass(frozen=True)
class TrainRunDir:
    """A training run (distillation, lottery levels): resumable, named by the hash of its identity."""

    root: Path

    checkpoint = _inside("checkpoint.safetensors")
    log = _inside("log.csv")
    config = _inside("config.json")


@dataclass(frozen=True)
class MeasureDir:
    """What `bench`, `advise` and `reproduce` write: NAME.md, NAME.json, NAME.png, and scratch
    work in the sibling ROOT.work/ (compressed and packed candidates)."""

    root: Path
    name: str

    md = property(lambda self: self.root / f"{self.name}.md")
    json = property(lambda self: self.root / f"{self.name}.json")
    png = property(lambda self: self.root / f"{self.name}.png")
    frontier = _inside("frontier.png")
    recommended = _inside("recommended.yaml")
    work = property(lambda self: self.root.with_name(self.root.name + ".work"))
    compressed = property(lambda self: self.work / "compressed")

    def packed(self, label: str) -> Path:
        return self.work / "packed" / label


@dataclass(frozen=True)
class LotteryDir:
    root: Path

    results = _inside("results.csv")
    summary = _inside("summary.csv")
    plot = _inside("lottery.png")
    config = _inside("config.json")


@dataclass(frozen=True)
class StreamWork:
    """A streamed compress of one recipe, in progress: `.OUTPUT.slimkit-stream/<recipe>/` beside
    the output. Each finished block leaves its weights and records here, and `state.json` says
    where to go on; the output is assembled from these files at the end, and the folder removed."""

    root: Path

    state = _inside("state.json")
    activations = _inside("activations.safetensors")  # the next block's calibration inputs
    outer = _inside("outer.safetensors")  # embedding / norm / head, when a step rewrote them

    def block_weights(self, index: int) -> Path:
        return self.root / "blocks" / f"{index:05d}.safetensors"

    def block_records(self, index: int) -> Path:
        return self.root / "records" / f"{index:05d}.safetensors"

    @staticmethod
    def beside(output: Path, recipe: str) -> StreamWork:
        return StreamWork(output.parent / f".{output.name}.slimkit-stream" / recipe)
