"""Proof that training learns: tiny GeoPixel on synthetic GeoPixelD-format data, CPU.

Generates a synthetic training set and a disjoint held-out set (different seed), measures the
held-out teacher-forced mask mIoU of the starting checkpoint, runs `geopixel train`'s loop for a
few minutes, reloads the merged export from `OUT/final` and measures again. Prints the loss curve
and a JSON summary (also written to OUT/bench_training.json).

The starting checkpoint is, by default, a random-weight model of the ``small`` size
(``geopixel_cli.train.random_init``: LLM and SAM-2 width 64, written to OUT/init), the same network
code as the released model; ``--init golden`` starts from the golden parity fixture instead (SAM-2
width 16, which caps what its mask decoder can learn, see docs/TRAINING.md), ``--model DIR`` from
any checkpoint directory. The text loss is weighted 0.005 by default (the reference: 1.0): the
synthetic captions' irreducible CE would otherwise drown the mask losses' gradient in the shared
LoRA weights of a random LLM (docs/TRAINING.md, "Proof that it learns").

Usage:
    python benchmarks/bench_training.py [--task gcg|rrsis] [--steps N] [--n-train N] [--lr LR]
        [--ce-weight W] [--seed S] [--init small|golden | --model DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from geopixel.training import LossWeights

from geopixel_cli.train.evaluate import evaluate_masks
from geopixel_cli.train.loop import TrainConfig, load_model, train
from geopixel_cli.train.random_init import SIZES, write_random_checkpoint
from geopixel_cli.train.records import read_json_list
from geopixel_cli.train.synthetic import write_dataset

GOLDEN = Path(__file__).resolve().parents[1] / ".." / "shared" / "golden" / "reference-tiny"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=("gcg", "rrsis"), default="gcg")
    parser.add_argument("--hd-num", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-val", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--object-scale", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--ce-weight", type=float, default=0.005, help="text loss weight (reference: 1.0; docs/TRAINING.md)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random start, LoRA and data order")
    parser.add_argument("--init", choices=("small", "golden"), default="small")
    parser.add_argument("--model", default=None, help="start from this checkpoint directory instead")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_training_"))
    shutil.rmtree(out / "run", ignore_errors=True)
    model = args.model
    if model is None and args.init == "golden":
        model = str(GOLDEN.resolve())
    elif model is None:
        shutil.rmtree(out / "init", ignore_errors=True)
        config, dims = SIZES[args.init]
        model = str(
            write_random_checkpoint(
                out / "init",
                template=GOLDEN.resolve(),
                config_overrides=config,
                dims_overrides=dims,
                seed=args.seed,
            )
        )
    train_set = write_dataset(
        out / "train_data", n=args.n_train, seed=1, size=args.size, object_scale=args.object_scale
    )
    val_set = write_dataset(
        out / "val_data", n=args.n_val, seed=2, size=args.size, object_scale=args.object_scale
    )
    kind = "gcg" if args.task == "gcg" else "rrsis"
    val = read_json_list(val_set[kind])
    cfg = TrainConfig(
        data=train_set[kind],
        model=model,
        output=out / "run",
        task=args.task,
        hd_num=args.hd_num,
        max_steps=args.steps,
        lr=args.lr,
        warmup_steps=args.warmup,
        save_every=max(args.steps // 4, 1),
        cache_sam_features=True,
        weights=LossWeights(ce=args.ce_weight),
        progress=True,
        seed=args.seed,
    )
    before = evaluate_masks(load_model(cfg, torch.device("cpu")), val, hd_num=args.hd_num)
    t0 = time.perf_counter()
    summary = train(cfg)
    seconds = time.perf_counter() - t0
    from geopixel.modeling import GeoPixel

    assert summary.export_dir is not None
    after = evaluate_masks(
        GeoPixel.from_pretrained(summary.export_dir, device="cpu", dtype="fp32"), val, hd_num=args.hd_num
    )
    every = max(args.steps // 12, 1)
    curve = [
        {k: round(r[k], 4) for k in ("step", "loss", "ce", "bce", "dice", "lr")}
        for r in summary.history
        if r["step"] % every == 0 or r["step"] == 1
    ]
    result = {
        "model": args.model or args.init,
        "task": args.task,
        "hd_num": args.hd_num,
        "lr": args.lr,
        "ce_weight": args.ce_weight,
        "seed": args.seed,
        "steps": args.steps,
        "n_train": args.n_train,
        "n_val_masks": after.n_masks,
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / args.steps, 3),
        "val_miou_before": round(before.miou, 4),
        "val_miou_after": round(after.miou, 4),
        "val_ce_before": round(before.ce, 4),
        "val_ce_after": round(after.ce, 4),
        "torch_threads": args.threads,
        "loss_curve": curve,
    }
    print("| step | loss | ce (w) | bce (w) | dice (w) | lr |\n|---|---|---|---|---|---|")
    for r in curve:
        cells = [str(r["step"])] + [f"{r[k]:.3f}" for k in ("loss", "ce", "bce", "dice")] + [f"{r['lr']:.2e}"]
        print("| " + " | ".join(cells) + " |")
    print(json.dumps({k: v for k, v in result.items() if k != "loss_curve"}, indent=2))
    (out / "bench_training.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
