"""Reading a user's text file (recipe, data, report, config) with an error that names it."""

from __future__ import annotations

from pathlib import Path

from slimkit.errors import SlimkitError


def read_text(path: str | Path, error: type[SlimkitError] = SlimkitError) -> str:
    """The file as UTF-8 text (a leading byte-order mark, as some editors write, is dropped); an
    unreadable or non-UTF-8 file raises `error` naming the file."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror}") from None
