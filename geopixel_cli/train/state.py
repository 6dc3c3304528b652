"""Optimiser, learning-rate schedule, and resumable training checkpoints.

A checkpoint ``OUT/checkpoints/step-0000123/`` holds everything needed to continue bit for bit:
``trainable.safetensors`` (every trainable parameter, LoRA adapters included, by our names),
``optimizer.pt`` (AdamW and scheduler state), ``rng-rank{r}.pt`` (Python, NumPy, torch CPU and CUDA
generators of each rank) and ``state.json`` (the step and the run settings that must not change on
resume). The data position is a pure function of the step (see :mod:`geopixel_cli.train.mixture`),
so it needs no extra state. Checkpoints are written to a temporary folder and renamed, so a kill
mid-write never leaves a half checkpoint that ``--resume`` would pick up.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

CKPT_DIR = "checkpoints"
# Settings that must be identical when resuming (anything else may change, e.g. --device).
RESUME_KEYS = (
    "data",
    "model",
    "task",
    "batch_size",
    "grad_accum",
    "hd_num",
    "seed",
    "lr",
    "total_steps",
    "warmup_steps",
    "world_size",
    "lora_r",
    "lora_alpha",
    "train_projector",
    "loss_weights",
)


def make_optimizer(params: list[nn.Parameter], *, lr: float) -> torch.optim.AdamW:
    """AdamW as the reference: betas (0.9, 0.95), eps 1e-8, weight decay 0."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)


def cosine_with_warmup(step: int, *, warmup: int, total: int) -> float:
    """HF ``get_cosine_schedule_with_warmup`` multiplier for optimizer step ``step`` (0-based)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to 0 over ``total`` optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, warmup=warmup, total=total)
    )


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (detached, CPU, contiguous)."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    output: Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    settings: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
    keep: int = 2,
    barrier: Any = None,
) -> Path:
    """Write the checkpoint of ``step`` (rank 0 writes weights/optimizer; every rank its RNG).

    Args:
        output: Run folder.
        step: Optimizer steps completed.
        model: The (unwrapped) model.
        optimizer: AdamW.
        scheduler: LR scheduler.
        settings: Run settings (``RESUME_KEYS`` are checked on resume).
        rank: This process's rank.
        world_size: Number of processes.
        keep: How many checkpoints to keep (oldest removed).
        barrier: Callable synchronising the ranks (None for one process).

    Returns:
        The checkpoint folder.
    """
    root = output / CKPT_DIR
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if barrier:
        barrier()
    torch.save(_rng_state(), tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt"
        )
        (tmp / "state.json").write_text(json.dumps({"step": step, "settings": settings}, indent=2))
    if barrier:
        barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        old = sorted(p for p in root.glob("step-*") if p.is_dir())
        for path in old[: max(len(old) - keep, 0)]:
            shutil.rmtree(path, ignore_errors=True)
    if barrier:
        barrier()
    return final


def latest_checkpoint(output: Path) -> Path | None:
    """Most recent complete checkpoint of a run folder (None if there is none)."""
    found = sorted(p for p in (output / CKPT_DIR).glob("step-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def check_settings(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Refuse to resume with settings that would change the run (data, schedule, model, ...).

    Raises:
        ValueError: Listing every differing setting.
    """
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
        for k in RESUME_KEYS
        if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise ValueError(f"cannot resume from {where}: settings differ: " + "; ".join(diffs))


def load_checkpoint_state(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    settings: dict[str, Any],
    rank: int = 0,
) -> int:
    """Restore a checkpoint into the live objects; return the number of completed steps.

    Raises:
        ValueError: Settings differ, or the trainable parameters do not match the model's.
    """
    meta = json.loads((path / "state.json").read_text())
    check_settings(meta["settings"], settings, path)
    saved = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    want = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != want:
        missing, extra = sorted(want - set(saved)), sorted(set(saved) - want)
        raise ValueError(
            f"{path}: trainable parameters differ (missing {missing[:5]}, unexpected {extra[:5]})"
        )
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value.to(params[name].device))
    opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng_file = path / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    return int(meta["step"])
