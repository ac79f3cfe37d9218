"""Rich progress bars for long loops, quiet when disabled or when not the main process."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


def _is_main_process() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0"


def progress_bar(items: Iterable[T], description: str, total: int | None = None,
                 enabled: bool = True) -> Iterator[T]:
    """Yield ``items`` while a rich progress bar shows how far the loop got."""
    if not enabled or not _is_main_process():
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
