"""Training-time image inputs: CLIP crops with the training HD rule, and the SAM-2 input tensor.

Training uses a different HD rule from inference (ARCHITECTURE.md §3, golden README quirk 2):
``min(ceil(1.5·W/560), s_budget)`` columns and **centred** white padding — implemented by
:func:`geopixel.hd_divider.plan_grid` with ``rule="training"``. ``hd_num`` is 9 for grounded
description (train.sh) and 1 for referring segmentation (finetune.sh).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from geopixel.hd_divider import apply_grid, crops_for_clip, image_token_count, normalize_clip, plan_grid

SAM_MEAN = (0.485, 0.456, 0.406)
SAM_STD = (0.229, 0.224, 0.225)
DEFAULT_HD_NUM = {"gcg": 9, "rrsis": 1}


def clip_crops(
    image: np.ndarray, hd_num: int, *, tile: int = 560, merged_grid: int = 20
) -> tuple[torch.Tensor, tuple[int, int], int]:
    """Training HD transform of one image → CLIP crops, grid and image-token count.

    Args:
        image: (H, W, 3) uint8 RGB.
        hd_num: Crop budget.
        tile: Crop side (560).
        merged_grid: Merged tokens per crop side (20).

    Returns:
        ``(crops (1 + h·w, 3, tile, tile), (h, w), L_img)``.
    """
    grid = plan_grid(image.shape[1], image.shape[0], hd_num, rule="training", tile=tile)
    crops = crops_for_clip(normalize_clip(apply_grid(image, grid)), grid, tile=tile)
    n_tokens = image_token_count(grid.rows, grid.cols, merged_grid=merged_grid)
    return crops, (grid.rows, grid.cols), n_tokens


def sam_input_tensor(image: np.ndarray, size: int = 1024) -> torch.Tensor:
    """SAM2Transforms: ``ToTensor`` → resize to size×size (bilinear, antialias) → ImageNet norm.

    Args:
        image: (H, W, 3) uint8 RGB.
        size: SAM input side.

    Returns:
        (3, size, size) float32 tensor.
    """
    tensor = (
        torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255.0)
    )  # (3, H, W)
    resized = F.interpolate(
        tensor[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )[0]
    mean_t = torch.tensor(SAM_MEAN, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(SAM_STD, dtype=torch.float32).view(3, 1, 1)
    return (resized - mean_t) / std_t  # (3, size, size)
