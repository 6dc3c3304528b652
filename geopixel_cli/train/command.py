"""``geopixel train``: fine-tune GeoPixel on GeoPixelD / RRSIS-D data (registered by the CLI).

Heavy imports (torch, the network) happen inside the command body, so ``geopixel --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def train_command(
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="Mixture file (data.txt: '<json> <thousands>' per line), GeoPixelD JSON list, "
            "RRSIS-D root, or a folder with data.txt / GeoPixelD.json.",
        ),
    ],
    model: Annotated[
        str, typer.Option("--model", help="Checkpoint directory or hub id to start from (finetune).")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Run folder: checkpoints, metrics, final/.")],
    *,
    sam2: Annotated[
        Path | None,
        typer.Option(
            help="SAM-2 checkpoint (sam2_hiera_large.pt): start from base weights, --model = IXC-2.5 dir."
        ),
    ] = None,
    task: Annotated[
        str, typer.Option(help="gcg (grounded description, hd 9) or rrsis (referring segmentation, hd 1).")
    ] = "gcg",
    epochs: Annotated[
        float, typer.Option(help="Passes over the data pool (ignored with --max-steps).")
    ] = 1.0,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps [default: from --epochs].")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (warmup then cosine).")] = 3e-4,
    batch_size: Annotated[int, typer.Option(help="Samples per process per micro-batch.")] = 1,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    hd_num: Annotated[int | None, typer.Option(help="Crops per image [default: 9 gcg, 1 rrsis].")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Warmup steps [default: min(150, 10%)].")] = None,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N optimizer steps.")] = 50,
    ce_weight: Annotated[float, typer.Option(help="Weight of the text cross-entropy.")] = 1.0,
    bce_weight: Annotated[float, typer.Option(help="Weight of the mask BCE.")] = 2.0,
    dice_weight: Annotated[float, typer.Option(help="Weight of the mask Dice loss.")] = 0.5,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Recompute LLM blocks in backward (less memory).")
    ] = False,
    freeze_projector: Annotated[
        bool, typer.Option("--freeze-projector", help="Keep vision_proj and the GN tokens frozen.")
    ] = False,
    cache_sam_features: Annotated[
        bool, typer.Option("--cache-sam-features", help="Keep SAM-2 encoder outputs per image (small data).")
    ] = False,
    workers: Annotated[
        int, typer.Option(help="Worker processes preparing batches (0: in the main process).")
    ] = 0,
    no_export: Annotated[
        bool, typer.Option("--no-export", help="Skip writing the merged final/ model.")
    ] = False,
    tensorboard: Annotated[
        bool, typer.Option("--tensorboard", help="Also write TensorBoard event files to -o/tensorboard.")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last checkpoint in -o.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Delete an existing run folder first.")
    ] = False,
    device: Annotated[str | None, typer.Option(help="cuda, cuda:1 or cpu [default: automatic].")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Frozen-weight dtype: bf16, fp16, fp32 [default: bf16 on GPU].")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of data order and initialisation.")] = 0,
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True, help="More log output.")] = 0,
    quiet: Annotated[
        int, typer.Option("-q", "--quiet", count=True, help="Less output, no progress bar.")
    ] = 0,
) -> None:
    """Fine-tune GeoPixel (LoRA r8/α16 on the LLM, text projection, mask decoder) with CE + BCE + Dice.

    Example: geopixel train --data data.txt --model MBZUAI/GeoPixel-7B -o runs/gcg --task gcg --epochs 9

    Multi-GPU (DDP): torchrun --nproc-per-node 4 --no-python geopixel train ...
    """
    from geopixel_cli.cli import configure_logging, guarded

    verbosity = configure_logging(verbose, quiet)

    def body() -> None:
        import shutil

        from geopixel.training import LossWeights

        from geopixel_cli.errors import UserError
        from geopixel_cli.train.loop import TrainConfig, train

        if task not in ("gcg", "rrsis"):
            raise UserError(f"--task must be gcg or rrsis, got {task!r}")
        if min(batch_size, grad_accum) < 1 or (max_steps is not None and max_steps < 1) or epochs <= 0:
            raise UserError("--batch-size, --grad-accum, --max-steps and --epochs must be positive")
        if min(ce_weight, bce_weight, dice_weight) < 0:
            raise UserError("--ce-weight, --bce-weight and --dice-weight must not be negative")
        if overwrite and resume:
            raise UserError("--overwrite and --resume exclude each other")
        if overwrite and output.exists():
            shutil.rmtree(output)
        cfg = TrainConfig(
            data=data,
            model=model,
            output=output,
            task=task,
            epochs=epochs,
            max_steps=max_steps,
            lr=lr,
            batch_size=batch_size,
            grad_accum=grad_accum,
            hd_num=hd_num,
            warmup_steps=warmup_steps,
            seed=seed,
            device=device,
            dtype=dtype,
            gradient_checkpointing=gradient_checkpointing,
            train_projector=not freeze_projector,
            save_every=save_every,
            weights=LossWeights(ce=ce_weight, bce=bce_weight, dice=dice_weight),
            resume=resume,
            cache_sam_features=cache_sam_features,
            workers=workers,
            export=not no_export,
            progress=verbosity >= 0,
            tensorboard=tensorboard,
        )
        try:
            summary = train(cfg)
        except (FileExistsError, FileNotFoundError, ValueError, ImportError) as exc:
            raise UserError(str(exc)) from exc
        last = summary.history[-1] if summary.history else {}
        typer.echo(
            f"{summary.steps} steps, last loss {last.get('loss', float('nan')):.4f}; run folder {output}"
        )
        if summary.export_dir is not None:
            typer.echo(f"merged model: {summary.export_dir} (use --model {summary.export_dir})")

    guarded(verbosity, body)
