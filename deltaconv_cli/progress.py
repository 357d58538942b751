"""Progress bars for long work: rich on a terminal, a log line every 5 % when output goes to a file."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def progress_bar(disable: bool = False) -> Progress:
    """A progress display on stderr (stdout stays for results and JSON) whose tasks carry a free-text
    ``status`` field (losses, rates)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(stderr=True),
        disable=disable,
    )


def advance(progress: Progress, task: int, status: str = "", steps: int = 1) -> None:
    """Advance ``task``; when the console is not a terminal, also print a line every 5 %."""
    progress.update(task, advance=steps, status=status)
    info = progress._tasks[task]
    done, total = int(info.completed), int(info.total or 1)
    if not progress.disable and not progress.console.is_terminal and done % max(1, total // 20) == 0:
        progress.console.print(f"{info.description}: {done}/{total} {status}", highlight=False)
