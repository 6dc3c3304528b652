"""Human-readable tables of an evaluation report (rich, on stderr) and the JSON report file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from geopixel_cli.eval.errors import EvalError

SPLIT_TITLES = {"uni_target": "Uni-Target", "multi_target": "Multi-Target", "overall": "Overall"}


def _pct(value: Any, decimals: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value < 0:  # COCOeval's "no GT in this split"
        return "n/a"
    return f"{100.0 * value:.{decimals}f}"


def gcg_table(report: dict[str, Any]) -> Any:
    """Table 2 of the paper: CIDEr and METEOR once (overall), AP50 / mIoU / Recall per split, x100.

    Args:
        report: The gcg report of :func:`geopixel_cli.eval.api.run_eval`.

    Returns:
        A ``rich.table.Table``.
    """
    from rich.table import Table

    variants = list(report["meta"]["recall_variants"])
    table = Table(title="RS-GCG (x100)", title_justify="left")
    table.add_column("split")
    for col in ("images", "CIDEr", "METEOR", "AP50", "mIoU"):
        table.add_column(col, justify="right")
    for v in variants:
        table.add_column("Recall IoU-only" if v == "iou_only" else "Recall", justify="right")
    for name in ("uni_target", "multi_target", "overall"):
        block = report["splits"][name]
        caption = report["caption"] if name == "overall" else {"CIDEr": None, "METEOR": None}
        row = [
            SPLIT_TITLES[name],
            str(block["num_images"]),
            _pct(caption["CIDEr"], 1),
            _pct(caption["METEOR"], 1),
            _pct(block["AP50"], 1),
            _pct(block["mIoU"], 1),
        ]
        for v in variants:
            row.append(_pct(block["recall"][v]["recall"], 1))
        table.add_row(*row)
    return table


def rrsis_table(report: dict[str, Any]) -> Any:
    """RMSIN/LAVT's printout as a table: P@0.5..0.9, oIoU, mIoU x100 with two decimals.

    Args:
        report: The rrsis report of :func:`geopixel_cli.eval.api.run_eval`.

    Returns:
        A ``rich.table.Table``.
    """
    from rich.table import Table

    cols = ["P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "oIoU", "mIoU"]
    table = Table(title=f"RRSIS, {report['num_samples']} sentences (x100)", title_justify="left")
    table.add_column("masks")
    for c in cols:
        table.add_column(c, justify="right")
    table.add_row("native", *[_pct(report[c], 2) for c in cols])
    for name, block in report.get("variants", {}).items():
        table.add_row(name, *[_pct(block[c], 2) for c in cols])
    return table


def print_report(report: dict[str, Any]) -> None:
    """Print the task's table on stderr.

    Args:
        report: A report of either task.
    """
    from rich.console import Console

    table = gcg_table(report) if report["task"] == "gcg" else rrsis_table(report)
    Console(stderr=True).print(table)
    if report["task"] == "gcg":
        text = report["meta"]["recall_text_model"]
        Console(stderr=True).print(f"Recall text model: {text}; CIDEr/METEOR over all images only.")


def write_report(report: dict[str, Any], path: Path, *, overwrite: bool = False) -> None:
    """Write the full-precision report as JSON.

    Args:
        report: A report of either task.
        path: Output file.
        overwrite: Replace an existing file.
    """
    if path.exists() and not overwrite:
        raise EvalError(f"{path} exists (use --overwrite)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
    except OSError as exc:
        raise EvalError(f"cannot write the report {path}: {exc}") from exc
