"""The training loop: data → training forward → AdamW steps, checkpoints, metrics, final export.

One loop for one process or many: under ``torchrun`` each rank gets a disjoint slice of every
global batch and the model is wrapped in PyTorch DDP (gloo on CPU, NCCL on GPU). Gradient
accumulation skips the all-reduce on all but the last micro-batch. On GPU the forward runs
under bf16 autocast with float32 trainable weights; frozen weights may be loaded in bf16.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from geopixel.training import LossWeights, TrainBatch, training_forward
from torch import nn

from geopixel_cli.train.hd import DEFAULT_HD_NUM
from geopixel_cli.train.lora import LoraSpec, add_lora, merge_lora, set_frozen_eval, set_trainable
from geopixel_cli.train.metrics import MetricsLog, require_tensorboard
from geopixel_cli.train.mixture import batches_per_epoch, build_pool, entries_for
from geopixel_cli.train.state import (
    check_settings,
    latest_checkpoint,
    load_checkpoint_state,
    make_optimizer,
    make_scheduler,
    save_checkpoint,
)
from geopixel_cli.train.stream import BatchStream, StepDataset

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of one training run (the ``geopixel train`` options).

    Attributes:
        data: Mixture file, JSON list, RRSIS-D root or folder (see :mod:`.mixture`).
        model: Checkpoint directory or hub id to start from (an IXC-2.5 directory with ``sam2``).
        sam2: SAM-2 checkpoint file: start from base weights (IXC-2.5 + SAM-2) instead of GeoPixel.
        output: Run folder (checkpoints, metrics, final export).
        task: ``gcg`` or ``rrsis`` (sets the default hd_num: 9 / 1).
        epochs: Passes over the pool (used when ``max_steps`` is None).
        max_steps: Optimizer steps (overrides ``epochs``).
        lr: Peak learning rate.
        batch_size: Samples per rank per micro-batch.
        grad_accum: Micro-batches per optimizer step.
        hd_num: Crop budget (None = task default).
        warmup_steps: Linear warmup (None = 150 capped at 10% of the steps, train.sh uses 150).
        seed: Seed of data order and initialisation.
        device: ``cpu``/``cuda``/None (best available).
        dtype: Weight dtype for frozen parts (None = bf16 on GPU, fp32 on CPU).
        gradient_checkpointing: Recompute LLM blocks in backward.
        train_projector: Train ``vision_proj`` and the GN tokens (train.sh does).
        lora: LoRA rank/alpha/dropout.
        weights: Loss weights.
        max_grad_norm: Clipping norm.
        save_every: Checkpoint every N steps (and at the end).
        keep_checkpoints: Checkpoints kept.
        resume: Continue from the latest checkpoint in ``output``.
        cache_sam_features: Keep SAM-2 encoder outputs per image (frozen encoder; small datasets).
        workers: DataLoader worker processes preparing batches (0 = in the training process).
        export: Write the merged released-layout directory ``output/final`` at the end.
        stop_after: Stop (as if killed) after this many steps; the schedule still uses max_steps.
        progress: Show a rich progress bar.
        tensorboard: Also write TensorBoard event files to ``output/tensorboard``.
    """

    data: Path
    model: str
    output: Path
    sam2: Path | None = None
    task: str = "gcg"
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 3e-4
    batch_size: int = 1
    grad_accum: int = 1
    hd_num: int | None = None
    warmup_steps: int | None = None
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    gradient_checkpointing: bool = False
    train_projector: bool = True
    lora: LoraSpec = field(default_factory=LoraSpec)
    weights: LossWeights = field(default_factory=LossWeights)
    max_grad_norm: float = 1.0
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = False
    cache_sam_features: bool = False
    workers: int = 0
    export: bool = True
    stop_after: int | None = None
    progress: bool = True
    tensorboard: bool = False


@dataclass
class TrainSummary:
    """What a run did: steps, last metrics, paths."""

    steps: int
    history: list[dict[str, Any]]
    output: Path
    export_dir: Path | None


class _StepModule(nn.Module):
    """Wraps the model so that DDP sees one ``forward(batch) -> (loss, stats)`` call."""

    def __init__(self, model: nn.Module, weights: LossWeights) -> None:
        super().__init__()
        self.model = model
        self.weights = weights

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        out = training_forward(self.model, batch, weights=self.weights)
        ce = self.weights.ce * out.ce  # weighted, like bce and dice (as the reference logs them)
        stats = torch.stack([out.loss, ce, out.bce, out.dice]).detach().float()
        return out.loss, stats


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _init_distributed(device: torch.device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def _pick_device(name: str | None, local_rank: int) -> torch.device:
    if name:
        dev = torch.device(name)
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def load_model(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """Load the starting checkpoint, add LoRA, set the trainable set (fp32 trainable weights)."""
    from geopixel.checkpoint import CheckpointError
    from geopixel.modeling import GeoPixel

    from geopixel_cli.errors import UserError

    dtype = cfg.dtype or ("bf16" if device.type == "cuda" else "fp32")
    torch.manual_seed(cfg.seed)
    try:
        if cfg.sam2 is not None:  # base weights: IXC-2.5 directory + SAM-2 checkpoint
            from geopixel.checkpoint import resolve_checkpoint

            from geopixel_cli.train.base_weights import load_base_model

            model = load_base_model(
                resolve_checkpoint(cfg.model), cfg.sam2, device=device, dtype=dtype, seed=cfg.seed
            )
        else:
            model = GeoPixel.from_pretrained(cfg.model, device=device, dtype=dtype)
    except CheckpointError as exc:
        raise UserError(f"--model {cfg.model}: {exc}") from exc
    model.llm.gradient_checkpointing = cfg.gradient_checkpointing
    for module in model.llm.modules():  # the PLoRA dropout of the reference (p = 0.05 in train mode)
        if isinstance(module, nn.Dropout):
            module.p = cfg.lora.dropout
    add_lora(model, cfg.lora)
    set_trainable(model, train_projector=cfg.train_projector)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def settings_of(cfg: TrainConfig, *, total_steps: int, warmup: int, world_size: int) -> dict[str, Any]:
    """JSON-able run settings (stored in checkpoints and compared on resume)."""
    raw = asdict(cfg)
    raw.update(
        sam2=None if cfg.sam2 is None else str(cfg.sam2),
        data=str(cfg.data),
        model=str(cfg.model),
        output=str(cfg.output),
        total_steps=total_steps,
        warmup_steps=warmup,
        world_size=world_size,
        lora_r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        loss_weights=[cfg.weights.ce, cfg.weights.bce, cfg.weights.dice],
        hd_num=cfg.hd_num or DEFAULT_HD_NUM[cfg.task],
    )
    return raw


def plan_steps(cfg: TrainConfig, pool_size: int, world: int) -> tuple[int, int]:
    """(total optimizer steps, warmup steps) for the run."""
    per_epoch = batches_per_epoch(pool_size, batch_size=cfg.batch_size, world_size=world)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(150, total // 10)
    return total, warmup


def train(cfg: TrainConfig) -> TrainSummary:
    """Run (or resume) training; see :class:`TrainConfig`.

    Returns:
        Steps done, per-step metrics of this process's run, the run folder and the export folder.
    """
    rank, world, local_rank = _dist_info()
    device = _pick_device(cfg.device, local_rank)
    if world > 1:
        _init_distributed(device)
    pool = build_pool(entries_for(cfg.data), seed=cfg.seed)
    total, warmup = plan_steps(cfg, len(pool), world)
    settings = settings_of(cfg, total_steps=total, warmup=warmup, world_size=world)
    found = latest_checkpoint(cfg.output)
    if cfg.resume and found is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {cfg.output / 'checkpoints'}")
    if not cfg.resume and found is not None:
        raise FileExistsError(f"{cfg.output} already has checkpoints: pass --resume or --overwrite")
    if found is not None:  # fail before loading the model when the settings changed
        check_settings(json.loads((found / "state.json").read_text())["settings"], settings, found)
    if cfg.tensorboard and rank == 0:
        require_tensorboard()  # fail before loading the model
    model = load_model(cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, lr=cfg.lr)
    scheduler = make_scheduler(optimizer, warmup=warmup, total=total)
    start = 0
    if found is not None:
        start = load_checkpoint_state(
            found, model=model, optimizer=optimizer, scheduler=scheduler, settings=settings, rank=rank
        )
        logger.info("resumed from %s at step %d", found, start)
        if rank == 0:
            _truncate_metrics(cfg.output / "metrics.jsonl", start)
    cfg.output.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (cfg.output / "train_config.json").write_text(json.dumps(settings, indent=2, default=str))
    step_module: nn.Module = _StepModule(model, cfg.weights)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        step_module = DDP(
            step_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    dataset = StepDataset(
        pool,
        tokenizer=model.tokenizer,
        config=model.config,
        hd_num=cfg.hd_num or DEFAULT_HD_NUM[cfg.task],
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        length=total * cfg.grad_accum,
        rank=rank,
        world=world,
    )
    batches = BatchStream(
        dataset,
        model,
        device,
        start=start * cfg.grad_accum,
        workers=cfg.workers,
        cache_sam_features=cfg.cache_sam_features,
    )
    set_frozen_eval(model)
    end = min(total, cfg.stop_after) if cfg.stop_after else total
    history = _run_steps(
        cfg,
        step_module,
        model,
        optimizer,
        scheduler,
        batches,
        device,
        start=start,
        end=end,
        total=total,
        rank=rank,
        world=world,
        settings=settings,
    )
    export_dir = None
    if end == total and cfg.export and rank == 0:
        from geopixel.checkpoint import resolve_checkpoint

        from geopixel_cli.train.export import export_checkpoint

        merge_lora(model)
        export_dir = export_checkpoint(
            model,
            cfg.output / "final",
            source=resolve_checkpoint(cfg.model),
            dtype=model.llm.norm.weight.dtype,
        )
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return TrainSummary(steps=end, history=history, output=cfg.output, export_dir=export_dir)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint a resumed run restarts from (killed mid-interval)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def _run_steps(
    cfg: TrainConfig,
    step_module: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: BatchStream,
    device: torch.device,
    *,
    start: int,
    end: int,
    total: int,
    rank: int,
    world: int,
    settings: dict[str, Any],
) -> list[dict[str, Any]]:
    from geopixel_cli.train.progress import TrainProgress

    barrier = None
    if world > 1:
        import torch.distributed as dist

        barrier = dist.barrier
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    history = []
    log = MetricsLog(cfg.output, tensorboard=cfg.tensorboard, enabled=rank == 0, start=start)
    with log, TrainProgress(total=total, start=start, enabled=cfg.progress and rank == 0) as bar:
        for step in range(start, end):
            t0 = time.perf_counter()
            stats = torch.zeros(4, device=device)
            for micro in range(cfg.grad_accum):
                batch = batches.next()
                sync = micro == cfg.grad_accum - 1 or world == 1
                ctx = step_module.no_sync() if not sync else contextlib.nullcontext()  # type: ignore[operator]
                with ctx, autocast:
                    loss, s = step_module(batch)
                with ctx:
                    (loss / cfg.grad_accum).backward()
                stats += s / cfg.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if world > 1:
                import torch.distributed as dist

                dist.all_reduce(stats)
                stats /= world
            row = {
                "step": step + 1,
                "lr": lr,
                "loss": float(stats[0]),
                "ce": float(stats[1]),
                "bce": float(stats[2]),
                "dice": float(stats[3]),
                "grad_norm": float(grad_norm),
                "seconds": time.perf_counter() - t0,
                "samples": (step + 1) * cfg.grad_accum * cfg.batch_size * world,
            }
            history.append(row)
            log.write(row)
            bar.update(row)
            done = step + 1
            if done % cfg.save_every == 0 or done == end:
                save_checkpoint(
                    cfg.output,
                    step=done,
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    settings=settings,
                    rank=rank,
                    world_size=world,
                    keep=cfg.keep_checkpoints,
                    barrier=barrier,
                )
    return history
