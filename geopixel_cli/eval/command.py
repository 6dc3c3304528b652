"""``geopixel eval``: the Typer command (registered in ``geopixel_cli.cli``)."""

from __future__ import annotations

import enum
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from geopixel_cli.errors import UserError


class Task(str, enum.Enum):
    """Evaluation task."""

    gcg = "gcg"
    rrsis = "rrsis"


def eval_command(
    *,
    task: Annotated[Task, typer.Option("--task", help="gcg (RS-GCG, Table 2) or rrsis (RRSIS-D, Table 3).")],
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="Ground truth. gcg: folder with *_gcg_coco_mask_gt.json + *_gcg_coco_caption_gt.json, "
            "or a GeoPixelD test folder. rrsis: gt.json or an RRSIS-D folder.",
        ),
    ],
    predictions: Annotated[
        Path | None,
        typer.Option(
            "--predictions",
            help="Saved predictions to score (gcg: folder of <image_id>.json; rrsis: predictions.json).",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Run this model (directory or hub id) over --data, then score."),
    ] = None,
    report: Annotated[
        Path | None, typer.Option("--report", help="Write every number to this JSON file.")
    ] = None,
    save_predictions: Annotated[
        Path | None,
        typer.Option(
            "--save-predictions", help="With --model: also save the predictions (--predictions layout)."
        ),
    ] = None,
    text_model: Annotated[
        str,
        typer.Option(
            "--text-model",
            help="gcg Recall's phrase encoder: auto (bert-base-uncased if available, else the packaged "
            "all-MiniLM-L6-v2), minilm, iou-only, or a model directory.",
        ),
    ] = "auto",
    splits: Annotated[
        Path | None,
        typer.Option(
            "--splits",
            help="gcg: JSON with uni_target/multi_target image ids [default: <data>/splits.json, "
            "else one GT phrase = uni-target].",
        ),
    ] = None,
    split: Annotated[str, typer.Option("--split", help="rrsis: RRSIS-D split of a native folder.")] = "test",
    device: Annotated[str | None, typer.Option("--device", help="With --model: torch device.")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="With --model: bf16, fp16 or fp32.")] = None,
    hd_num: Annotated[int, typer.Option("--hd-num", help="With --model: max 560 px crops per image.")] = 9,
    batch_size: Annotated[int, typer.Option("--batch-size", help="With --model: images per model call.")] = 1,
    max_new_tokens: Annotated[
        int | None,
        typer.Option("--max-new-tokens", help="With --model: generation limit [1024 gcg, 64 rrsis]."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")] = False,
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True, help="Tracebacks on errors.")] = 0,
) -> None:
    """Score RS-GCG or RRSIS predictions exactly as the paper's reference code does.

    Example: geopixel eval --task gcg --data GT_DIR --predictions PRED_DIR --report report.json
    """
    try:
        _run(**locals())
    except UserError as exc:
        if verbose > 0:
            traceback.print_exc(file=sys.stderr)
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None


def _run(
    *,
    task: Task,
    data: Path,
    predictions: Path | None,
    model: str | None,
    report: Path | None,
    save_predictions: Path | None,
    text_model: str,
    splits: Path | None,
    split: str,
    device: str | None,
    dtype: str | None,
    hd_num: int,
    batch_size: int,
    max_new_tokens: int | None,
    overwrite: bool,
    verbose: int,
) -> None:
    from geopixel_cli.eval.api import run_eval
    from geopixel_cli.eval.errors import EvalError
    from geopixel_cli.eval.report import print_report, write_report

    if report is not None and report.exists() and not overwrite:
        raise EvalError(f"{report} exists (use --overwrite)")
    if not data.exists():
        raise EvalError(f"--data {data} does not exist")
    result = run_eval(
        task.value,
        data,
        predictions=predictions,
        model=model,
        text_model=text_model,
        splits_file=splits,
        split=split,
        save_predictions=save_predictions,
        overwrite=overwrite,
        hd_num=hd_num,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        device=device,
        dtype=dtype,
        progress=True,
        notify=lambda msg: typer.echo(f"note: {msg}", err=True),
    )
    print_report(result)
    if report is not None:
        write_report(result, report, overwrite=overwrite)
        typer.echo(str(report))
