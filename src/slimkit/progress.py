"""Progress reporting that algorithms never see: the pipeline reports, the CLI renders."""

from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator, Protocol, TypeVar

T = TypeVar("T")


class Progress(Protocol):
    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]: ...

    def note(self, text: str) -> None:
        """A one-line update inside a long step (e.g. from a worker process)."""


class NoProgress:
    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        yield from items

    def note(self, text: str) -> None:
        pass


class LineProgress:
    """Progress as plain lines, for logs and pipes: each outermost stage's start, then a line at
    most every `every` seconds from whichever stage is running, and the end of any stage that
    took that long. No long stage is silent, and short inner loops add nothing."""

    def __init__(self, write: Callable[[str], None], every: float = 10.0):
        self.write, self.every = write, every
        self._depth = 0
        self._last = time.monotonic()

    def _say(self, text: str) -> None:
        self.write(text)
        self._last = time.monotonic()

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        of = f"/{total}" if total is not None else ""
        start = time.monotonic()
        if self._depth == 0:
            self._say(f"{description}: started")
        self._depth += 1
        done = 0
        try:
            for item in items:
                yield item
                done += 1
                if time.monotonic() - self._last >= self.every:
                    self._say(f"{description}: {done}{of} ({time.monotonic() - start:.0f}s)")
        finally:
            self._depth -= 1
        if time.monotonic() - start >= self.every or self._depth == 0:
            self._say(f"{description}: done {done}{of} in {time.monotonic() - start:.0f}s")

    def note(self, text: str) -> None:
        self._say(text)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        pass


class RichProgress:
    """Progress bars with elapsed time and ETA, rendered by rich; plain lines when the output is
    not a terminal (a log, a pipe, CI)."""

    def __new__(cls, console=None):
        if console is not None and not console.is_terminal:
            return LineProgress(lambda text: console.print(text, markup=False, highlight=False))
        return super().__new__(cls)

    def __init__(self, console=None):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import (
            Progress as _Progress,
        )

        self._progress = _Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )

    def __enter__(self) -> "RichProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def note(self, text: str) -> None:
        self._progress.console.print(text, markup=False, highlight=False)

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        task = self._progress.add_task(description, total=total)
        try:
            for item in items:
                yield item
                self._progress.advance(task)
        finally:
            self._progress.remove_task(task)
