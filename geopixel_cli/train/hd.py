"""Training-time image preprocessing: the reference's ``R560_HD18_Identity_transform`` + SAM-2 input.

Training uses a different HD rule from inference (ARCHITECTURE.md §3, README quirk 2): the column
count is ``min(ceil(1.5·W/560), s_budget)`` and the height padding is **centred** (white). hd_num
is 9 for grounded description (train.sh) and 1 for referring segmentation (finetune.sh).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_MEAN = (0.485, 0.456, 0.406)
SAM_STD = (0.229, 0.224, 0.225)
TILE = 560
DEFAULT_HD_NUM = {"gcg": 9, "rrsis": 1}


def budget_scale(ratio: float, hd_num: int) -> int:
    """Largest s >= 1 with ``s * ceil(s / ratio) <= hd_num`` (0 if none), as the reference loops.

    Args:
        ratio: Width / height after the portrait transpose (>= 1).
        hd_num: Crop budget.

    Returns:
        The budget-limited column count.
    """
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    return scale - 1


def train_hd_grid(width: int, height: int, hd_num: int) -> tuple[int, int]:
    """Crop grid (rows, cols) the training transform produces for an image of this size.

    Args:
        width: Image width.
        height: Image height.
        hd_num: Crop budget.

    Returns:
        (h, w) tile counts of the padded canvas.
    """
    trans = width < height
    if trans:
        width, height = height, width
    ratio = width / height
    cols = int(min(math.ceil(width * 1.5 / TILE), budget_scale(ratio, hd_num)))
    new_w = cols * TILE
    new_h = int(new_w / ratio)
    rows = math.ceil(new_h / TILE)
    return (cols, rows) if trans else (rows, cols)


def train_hd_image(image: Image.Image, hd_num: int) -> Image.Image:
    """``R560_HD18_Identity_transform``: resize to a 560-multiple width, pad height centred, white.

    Args:
        image: RGB PIL image.
        hd_num: Crop budget (9 for gcg, 1 for rrsis in the released recipes).

    Returns:
        The padded RGB PIL image (W and H multiples of 560).
    """
    img = image
    trans = img.width < img.height
    if trans:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    width, height = img.size
    ratio = width / height
    scale = int(min(math.ceil(width * 1.5 / TILE), budget_scale(ratio, hd_num)))
    new_w = scale * TILE
    new_h = int(new_w / ratio)
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    target = math.ceil(new_h / TILE) * TILE
    top = (target - new_h) // 2
    canvas = Image.new("RGB", (new_w, target), (255, 255, 255))
    canvas.paste(img, (0, top))
    if trans:
        canvas = canvas.transpose(Image.Transpose.TRANSPOSE)
    return canvas


def _normalize(array: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    tensor = (
        torch.from_numpy(np.array(array, dtype=np.uint8)).permute(2, 0, 1).float().div(255.0)
    )  # (3, H, W)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean_t) / std_t


def train_hd_tensor(image: Image.Image, hd_num: int) -> torch.Tensor:
    """Training HD transform + ``ToTensor`` + CLIP normalisation.

    Args:
        image: RGB PIL image.
        hd_num: Crop budget.

    Returns:
        (3, 560·h, 560·w) float32 tensor.
    """
    return _normalize(np.asarray(train_hd_image(image, hd_num)), CLIP_MEAN, CLIP_STD)


def sam_input_tensor(image: Image.Image, size: int = 1024) -> torch.Tensor:
    """SAM2Transforms: ``ToTensor`` → resize to size×size (bilinear, antialias) → ImageNet norm.

    Args:
        image: RGB PIL image.
        size: SAM input side.

    Returns:
        (3, size, size) float32 tensor.
    """
    tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255.0)
    resized = F.interpolate(
        tensor[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )[0]
    mean_t = torch.tensor(SAM_MEAN, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(SAM_STD, dtype=torch.float32).view(3, 1, 1)
    return (resized - mean_t) / std_t  # (3, size, size)


def image_token_count(rows: int, cols: int, merged_grid: int = 20) -> int:
    """Image tokens the vision tower emits for an h×w grid: (h·w+1)·g² + 1 + (h+1)·g.

    Args:
        rows: Tile rows h.
        cols: Tile columns w.
        merged_grid: Merged tokens per crop side (20).

    Returns:
        Sequence length of the image embedding.
    """
    return (rows * cols + 1) * merged_grid * merged_grid + 1 + (rows + 1) * merged_grid
