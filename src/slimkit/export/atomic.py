"""Atomic output directories: write into a hidden temp dir beside the target, then rename.

A crash, a full disk or Ctrl-C leaves either the previous complete directory or nothing under
the final name; never a half-written model that looks complete. Leftover temp dirs are hidden
(`.NAME.partial-*`) and removed by the next successful write to the same target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from slimkit.errors import OutputExistsError

PARTIAL_MARKER = ".partial-"


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_partials(final: Path) -> None:
    for stale in final.parent.glob(f".{final.name}{PARTIAL_MARKER}*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory; on success it becomes `final` in one rename.

    On any exception (KeyboardInterrupt included) the temp dir is deleted and `final` is left
    untouched. With `overwrite`, an existing `final` is replaced only after the new one is
    complete.
    """
    final = Path(final).absolute()
    if final.exists() and not overwrite:
        raise OutputExistsError(f"output {final} already exists; pass --overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}{PARTIAL_MARKER}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            old = final.parent / f".{final.name}{PARTIAL_MARKER}old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_stale_partials(final)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a single file atomically (temp file in the same dir, then replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}{PARTIAL_MARKER}{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
