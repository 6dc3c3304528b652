"""Held-out mask quality during training: teacher-forced mask IoU.

The ground-truth answer is fed (teacher forcing, as in training), the ``[SEG]`` hidden states are
decoded by SAM-2 with mask token 0, and each predicted mask (logits > 0) is compared with its
ground truth. This measures the grounding path independently of free generation; with a tiny
random-weight model, generation would rarely produce a ``[SEG]`` at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from geopixel.training import training_forward
from torch import nn

from geopixel_cli.train.collate import collate, make_example
from geopixel_cli.train.records import Record, load_sample


@dataclass
class MaskScores:
    """Teacher-forced evaluation of a record set.

    Attributes:
        miou: Mean IoU over all masks.
        ce: Mean text CE over the records.
        n_masks: Number of masks scored.
        ious: IoU per mask.
    """

    miou: float
    ce: float
    n_masks: int
    ious: list[float]


def mask_iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """IoU per mask of boolean (n, H, W) tensors (1.0 when both are empty)."""
    inter = (pred & gt).flatten(1).sum(-1).float()
    union = (pred | gt).flatten(1).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@torch.no_grad()
def evaluate_masks(model: nn.Module, records: list[Record], *, hd_num: int) -> MaskScores:
    """Teacher-forced mask IoU and CE of ``records`` (model temporarily in eval mode).

    Args:
        model: A :class:`~geopixel.modeling.GeoPixel` (LoRA adapters allowed).
        records: Held-out records.
        hd_num: Crop budget.

    Returns:
        The scores.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ious: list[float] = []
    ces = []
    try:
        for rec in records:
            example = make_example(
                load_sample(rec), tokenizer=model.tokenizer, config=model.config, hd_num=hd_num
            )
            batch = collate([example], pad_id=model.config.llm.pad_token_id).to(device)
            out = training_forward(model, batch)
            ces.append(float(out.ce))
            for logits, gt in zip(out.mask_logits, batch.gt_masks, strict=True):
                if gt.shape[0]:
                    ious.extend(mask_iou(logits > 0, gt > 0).tolist())
    finally:
        model.train(was_training)
    miou = sum(ious) / len(ious) if ious else float("nan")
    return MaskScores(miou=miou, ce=sum(ces) / max(len(ces), 1), n_masks=len(ious), ious=ious)
