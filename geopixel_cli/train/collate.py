"""Decoded samples → model-ready examples → right-padded batches (ARCHITECTURE.md §5.2).

Per sample: training HD crops, ``image + [BOS] + conversation + </s>`` ids with ``-1`` at the
image positions, labels from ``mask_human_targets``, the SAM-2 input and the ground-truth masks.
Batches are right-padded with the pad id (0), label −100 and im_mask 0, as the reference collator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from geopixel.config import GeoPixelConfig
from geopixel.tokenizer import IGNORE_INDEX, GeoPixelTokenizer
from geopixel.training import TrainBatch

from geopixel_cli.train.hd import clip_crops, sam_input_tensor
from geopixel_cli.train.records import Sample, TrainDataError


@dataclass
class Example:
    """One sample ready for collation.

    Attributes:
        where: Origin of the record.
        input_ids: (T,) ids, ``-1`` at image positions.
        labels: (T,) labels.
        n_image_tokens: Leading image positions.
        crops: (1 + h·w, 3, 560, 560) CLIP crops.
        grid: (h, w).
        sam_pixels: (3, 1024, 1024).
        masks: (n, H, W) uint8.
    """

    where: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    n_image_tokens: int
    crops: torch.Tensor
    grid: tuple[int, int]
    sam_pixels: torch.Tensor
    masks: torch.Tensor


def make_example(
    sample: Sample, *, tokenizer: GeoPixelTokenizer, config: GeoPixelConfig, hd_num: int
) -> Example:
    """Preprocess one decoded sample.

    Args:
        sample: Decoded record.
        tokenizer: GeoPixel tokenizer.
        config: Model configuration (tile size, SAM size, special ids, max length).
        hd_num: Crop budget of the training HD rule.

    Returns:
        The example.

    Raises:
        TrainDataError: The sequence exceeds the model's context, or [SEG] labels and masks differ.
    """
    image = np.asarray(sample.image)
    crops, grid, n_img = clip_crops(
        image, hd_num, tile=config.vision.image_size, merged_grid=config.vision.merged_grid
    )
    turns = [
        {"from": "human" if role == "user" else "bot", "value": text} for role, text in sample.conversations
    ]
    ids, labels = tokenizer.training_example(turns, n_img)
    if len(ids) > config.llm.max_length:
        raise TrainDataError(
            f"{sample.where}: {len(ids)} tokens exceed the {config.llm.max_length}-token context "
            f"(hd_num {hd_num} gives {n_img} image tokens); lower --hd-num"
        )
    n_seg_labels = sum(1 for t in labels if t == config.seg_token_id)
    if n_seg_labels != sample.masks.shape[0]:
        raise TrainDataError(
            f"{sample.where}: {n_seg_labels} [SEG] in the supervised answer but "
            f"{sample.masks.shape[0]} masks "
            "(a [SEG] in a user turn is never supervised)"
        )
    return Example(
        where=sample.where,
        input_ids=torch.tensor(ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        n_image_tokens=n_img,
        crops=crops,
        grid=grid,
        sam_pixels=sam_input_tensor(image, config.grounding.image_size),
        masks=torch.from_numpy(np.ascontiguousarray(sample.masks)),
    )


def collate(examples: list[Example], *, pad_id: int = 0) -> TrainBatch:
    """Right-pad examples into a :class:`~geopixel.training.TrainBatch`.

    Args:
        examples: Preprocessed samples.
        pad_id: Pad token id (0 = ``<unk>``, as train.py sets it).

    Returns:
        The batch.
    """
    length = max(e.input_ids.shape[0] for e in examples)
    bsz = len(examples)
    input_ids = torch.full((bsz, length), pad_id, dtype=torch.long)
    labels = torch.full((bsz, length), IGNORE_INDEX, dtype=torch.long)
    im_mask = torch.zeros((bsz, length), dtype=torch.bool)
    for b, ex in enumerate(examples):
        n = ex.input_ids.shape[0]
        input_ids[b, :n] = ex.input_ids
        labels[b, :n] = ex.labels
        im_mask[b, : ex.n_image_tokens] = True
    return TrainBatch(
        input_ids=input_ids,
        labels=labels,
        im_mask=im_mask,
        crops=torch.cat([e.crops for e in examples]),
        grids=[e.grid for e in examples],
        sam_pixels=torch.stack([e.sam_pixels for e in examples]),
        gt_masks=[e.masks for e in examples],
    )
