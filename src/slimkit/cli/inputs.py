"""Every path a command reads, collected from its arguments in one place, so that no option
(`--data`, `-r FILE`, `--reference`, `--offload-activations`, a compared model...) can be
forgotten by the output policy: a replaced output never holds one of them.

A value counts as a path when it is a `Path` (typer's path options), names something that exists,
or has a directory part; lists count item by item. The output options themselves are not inputs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

OUTPUT_ARGUMENTS = frozenset({"output"})


def _paths(value) -> Iterator[str]:
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _paths(item)
    elif isinstance(value, Path):
        yield str(value)
    elif isinstance(value, str) and value and (os.sep in value or os.path.lexists(value)):
        yield value


def command_inputs(arguments: dict) -> list[str]:
    """The paths among a command's arguments (by name), the output arguments left out."""
    return [p for name, value in arguments.items() if name not in OUTPUT_ARGUMENTS for p in _paths(value)]
