"""Rich progress bars for long first-run steps (assembling and hashing the model)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from p2pcache.local import ProgressFactory


@contextmanager
def progress_bars(console: Console) -> Iterator[ProgressFactory]:
    """Yields a factory of progress callbacks; a bar appears only once work is reported."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:

        def factory(description: str):  # type: ignore[no-untyped-def]
            task = None

            def update(done: int, total: int) -> None:
                nonlocal task
                if task is None:
                    task = progress.add_task(description, total=total)
                progress.update(task, completed=done)

            return update

        yield factory
