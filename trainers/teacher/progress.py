"""A rich progress display that training loops report to through plain callbacks."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

OnStep = Callable[[int, int], None]


@contextmanager
def progress(show: bool = True) -> Iterator[Callable[[str], OnStep | None]]:
    """Yields ``task(label) -> on_step(done, total)`` (None when ``show`` is false)."""
    if not show:
        yield lambda label: None
        return
    cols = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*cols, console=Console(stderr=True)) as bar:

        def task(label: str) -> OnStep:
            tid = bar.add_task(label, total=None)
            return lambda done, total: bar.update(tid, completed=done, total=total)

        yield task
