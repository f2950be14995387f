"""Every file and folder slimkit writes, named in one place (in the spirit of open_lth's paths.py).

A layout is a frozen dataclass over a root directory; its properties are the paths inside it.
Code that writes or reads an output asks its layout, never spells a file name itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelDir:
    """One compressed model: a plain Hugging Face directory plus what compression kept."""

    root: Path

    weights_glob = "model*.safetensors"
    recipe = property(lambda self: self.root / "recipe.yaml")
    report_json = property(lambda self: self.root / "report.json")
    report_md = property(lambda self: self.root / "report.md")
    compression = property(lambda self: self.root / "compression.safetensors")
    training_curve = property(lambda self: self.root / "training_curve.png")
    packed = property(lambda self: self.root / "packed")  # `compress --bench` packs here


@dataclass(frozen=True)
class CompressOutput:
    """`slimkit compress -o ROOT`: ROOT is the model dir for one recipe, else ROOT/<recipe>/ each,
    with a summary comparing them."""

    root: Path
    recipes: tuple[str, ...]

    def model_dir(self, recipe: str) -> ModelDir:
        return ModelDir(self.root if len(self.recipes) == 1 else self.root / recipe)

    def model_dirs(self) -> list[ModelDir]:
        return [self.model_dir(r) for r in self.recipes]

    summary_md = property(lambda self: self.root / "summary.md")
    summary_json = property(lambda self: self.root / "summary.json")
    bench_md = property(lambda self: self.root / "bench.md")


@dataclass(frozen=True)
class PackedDir:
    root: Path

    weights = property(lambda self: self.root / "packed.safetensors")
    summary = property(lambda self: self.root / "pack.json")


@dataclass(frozen=True)
class ExportDir:
    root: Path

    gguf = property(lambda self: self.root / "model.gguf")
    weights = property(lambda self: self.root / "model.safetensors")
    summary = property(lambda self: self.root / "export.json")


@dataclass(frozen=True)
class TrainRunDir:
    """A training run (distillation, lottery levels): resumable, named by the hash of its identity."""

    root: Path

    checkpoint = property(lambda self: self.root / "checkpoint.safetensors")
    log = property(lambda self: self.root / "log.csv")
    config = property(lambda self: self.root / "config.json")


@dataclass(frozen=True)
class MeasureDir:
    """What `bench`, `advise` and `reproduce` write: NAME.md, NAME.json, NAME.png, and scratch
    work in the sibling ROOT.work/ (compressed and packed candidates)."""

    root: Path
    name: str

    md = property(lambda self: self.root / f"{self.name}.md")
    json = property(lambda self: self.root / f"{self.name}.json")
    png = property(lambda self: self.root / f"{self.name}.png")
    frontier = property(lambda self: self.root / "frontier.png")
    recommended = property(lambda self: self.root / "recommended.yaml")
    work = property(lambda self: self.root.with_name(self.root.name + ".work"))
    compressed = property(lambda self: self.work / "compressed")

    def packed(self, label: str) -> Path:
        return self.work / "packed" / label


@dataclass(frozen=True)
class LotteryDir:
    root: Path

    results = property(lambda self: self.root / "results.csv")
    summary = property(lambda self: self.root / "summary.csv")
    plot = property(lambda self: self.root / "lottery.png")
    config = property(lambda self: self.root / "config.json")
