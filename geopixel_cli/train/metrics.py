"""Per-step training metrics: ``metrics.jsonl`` always, TensorBoard event files optionally."""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import Any

SCALARS = ("loss", "ce", "bce", "dice", "lr", "grad_norm")


class MetricsLog:
    """Append one JSON line per optimizer step (and TensorBoard scalars with ``tensorboard``).

    Args:
        output: Run folder: ``metrics.jsonl`` and ``tensorboard/`` go there.
        tensorboard: Also write TensorBoard event files (needs the ``tensorboard`` package).
        enabled: False on ranks other than 0 (nothing is written).
        start: Step the run (re)starts from; TensorBoard events logged after it by a killed run
            are purged, as the JSONL lines are by the resume.

    Raises:
        ImportError: ``tensorboard`` asked for but not installed (message says how to install).
    """

    def __init__(
        self, output: Path, *, tensorboard: bool = False, enabled: bool = True, start: int = 0
    ) -> None:
        self.path = output / "metrics.jsonl"
        self.enabled = enabled
        self.writer: Any = None
        if enabled and tensorboard:
            self.writer = open_tensorboard(output / "tensorboard", purge_step=start + 1)

    def write(self, row: dict[str, Any]) -> None:
        """Log one step's metrics (``row['step']`` is the 1-based optimizer step)."""
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key in SCALARS:
                if key in row:
                    self.writer.add_scalar(f"train/{key}", row[key], row["step"])

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def require_tensorboard() -> None:
    """Raise a one-line ImportError saying how to install ``tensorboard`` when it is missing."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise ImportError(
            "--tensorboard needs the tensorboard package: pip install tensorboard "
            "(or install geopixel with its [tensorboard] extra)"
        )


def open_tensorboard(log_dir: Path, *, purge_step: int | None = None) -> Any:  # noqa: ANN401
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``log_dir``.

    Raises:
        ImportError: The ``tensorboard`` package is missing.
    """
    require_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir), purge_step=purge_step)
