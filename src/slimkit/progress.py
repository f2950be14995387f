"""Progress reporting that algorithms never see: the pipeline reports, the CLI renders."""

from __future__ import annotations

from typing import Iterable, Iterator, Protocol, TypeVar

T = TypeVar("T")


class Progress(Protocol):
    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]: ...


class NoProgress:
    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        yield from items


class RichProgress:
    """Progress bars with elapsed time and ETA, rendered by rich."""

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
