"""rich progress bar for training: step count, loss, learning rate, seconds per step."""

from __future__ import annotations

from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    """Context manager showing the optimizer steps with the latest loss and learning rate.

    Args:
        total: Total optimizer steps of the run.
        start: Steps already done (resume).
        enabled: False makes every call a no-op (non-zero ranks, tests, ``--quiet``).
    """

    def __init__(self, *, total: int, start: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  ce {task.fields[ce]:.3f}  lr {task.fields[lr]:.2e}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not enabled,
        )
        self.task = self.progress.add_task(
            "train", total=total, completed=start, loss=float("nan"), ce=float("nan"), lr=0.0
        )

    def __enter__(self) -> TrainProgress:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()

    def update(self, row: dict[str, Any]) -> None:
        """Advance one step and show its metrics."""
        if self.enabled:
            self.progress.update(self.task, advance=1, loss=row["loss"], ce=row["ce"], lr=row["lr"])
