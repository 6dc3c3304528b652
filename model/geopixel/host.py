"""The host side of a GeoPixel call: inputs prepared before the device runs, results after.

:meth:`GeoPixel.prepare <geopixel.modeling.GeoPixel.prepare>` loads the images, tokenizes the
questions, picks each image's crop grid (ARCHITECTURE.md §3), builds the normalized CLIP crops with
the bicubic global view (§4.1) and the SAM-2 1024² input (§8.2), all on the CPU in the model
dtype; :meth:`GeoPixel.run_prepared <geopixel.modeling.GeoPixel.run_prepared>` does the rest on
the model's device. Keeping this half separate lets a caller prepare the next batch on CPU threads
while the device runs the current one (the CLI's reader threads do), and the device receives
model-dtype tensors one CLIP or SAM-2 chunk at a time instead of float32 copies of a whole batch.

:func:`collect_result` turns the device outputs of one image into a :class:`GeoPixelResult`,
copying as little as possible to the host.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from geopixel.config import GeoPixelConfig
from geopixel.hd_divider import Grid, apply_grid, crops_for_clip, image_token_count, normalize_clip, plan_grid
from geopixel.result import GeoPixelResult
from geopixel.tokenizer import GeoPixelTokenizer, parse_phrases

if TYPE_CHECKING:
    from geopixel.generate import GenerationOutput
    from geopixel.grounding import MaskOutput

ImageInput = np.ndarray | str | Path | Image.Image
logger = logging.getLogger(__name__)


@dataclass
class PreparedBatch:
    """Model-ready CPU tensors for a batch of images (the output of ``GeoPixel.prepare``).

    Attributes:
        images: (H, W, 3) uint8 RGB arrays; masks come back at these sizes.
        text_ids: Per image, the chat-prompt token ids that follow the image tokens (§5.1).
        grids: Per image, the crop grid it was divided on.
        crops: Per image, (1 + rows·cols, 3, S, S) normalized CLIP crops, global view first, in
            the model dtype, on the CPU.
        sam_pixels: Per image, the (3, 1024, 1024) SAM-2 input in the model dtype on the CPU, or
            None when only the prompts were prepared (``GeoPixel.build_prompts``).
        max_new_tokens: The answer budget the grids were fitted for (the generation limit).
    """

    images: list[np.ndarray]
    text_ids: list[list[int]]
    grids: list[Grid]
    crops: list[Tensor]
    sam_pixels: list[Tensor] | None
    max_new_tokens: int

    def __len__(self) -> int:
        """Number of images."""
        return len(self.images)

    @classmethod
    def join(cls, parts: Sequence[PreparedBatch]) -> PreparedBatch:
        """One batch from several (e.g. tiles prepared one by one on reader threads), in order.

        Args:
            parts: Batches prepared with the same ``max_new_tokens``.

        Returns:
            Their concatenation.

        Raises:
            ValueError: No parts, or parts prepared for different ``max_new_tokens``.
        """
        if not parts:
            raise ValueError("nothing to join")
        budgets = {p.max_new_tokens for p in parts}
        if len(budgets) != 1:
            raise ValueError(f"batches prepared for different max_new_tokens: {sorted(budgets)}")
        with_sam = [p.sam_pixels is not None for p in parts]
        return cls(
            images=[im for p in parts for im in p.images],
            text_ids=[ids for p in parts for ids in p.text_ids],
            grids=[g for p in parts for g in p.grids],
            crops=[c for p in parts for c in p.crops],
            sam_pixels=[s for p in parts for s in (p.sam_pixels or [])] if all(with_sam) else None,
            max_new_tokens=budgets.pop(),
        )


def fit_grid(image: np.ndarray, hd_num: int, *, reserved: int, config: GeoPixelConfig) -> Grid:
    """The reference's crop grid, or the largest smaller one whose prompt fits ``max_length``.

    Args:
        image: (H, W, 3) array.
        hd_num: Crop budget.
        reserved: Prompt tokens besides the image tokens (BOS, question, answer budget).
        config: Model sizes (context length, merged grid).

    Returns:
        The grid (``downscaled`` when smaller than the reference's; logged).

    Raises:
        ValueError: The prompt cannot fit even on one tile.
    """
    height, width = image.shape[:2]
    limit = config.llm.max_length
    g, tile = config.vision.merged_grid, config.vision.image_size
    grid = plan_grid(width, height, hd_num, rule="inference", tile=tile)
    cap = grid.num_tiles
    while image_token_count(grid.rows, grid.cols, merged_grid=g) + reserved > limit:
        cap -= 1
        if cap < 1:
            raise ValueError(
                f"the prompt cannot fit the model's {limit}-token context with {reserved} tokens of text "
                f"and answer, even on one tile: lower max_new_tokens"
            )
        grid = plan_grid(width, height, hd_num, rule="inference", max_tiles=cap, tile=tile)
    if grid.downscaled:
        logger.warning(
            "%dx%d image divided on %dx%d tiles instead of the reference's grid so that prompt + "
            "max_new_tokens fit the %d-token context", width, height, grid.rows, grid.cols, limit,
        )
    return grid


def clip_crops(image: np.ndarray, grid: Grid, *, tile: int, dtype: torch.dtype) -> Tensor:
    """Divide, normalize and crop one image for CLIP, cast to ``dtype`` on the CPU.

    Args:
        image: (H, W, 3) uint8 RGB.
        grid: Its crop grid.
        tile: Crop size (560).
        dtype: The model dtype (the cast the vision tower would otherwise do on the device).

    Returns:
        (1 + rows·cols, 3, tile, tile): the bicubic global view, then the tiles row-major.
    """
    return crops_for_clip(normalize_clip(apply_grid(image, grid)), grid, tile=tile).to(dtype)


def load_image(image: ImageInput) -> np.ndarray:
    """Return an (H, W, 3) uint8 RGB array from an array, a PIL image or a path.

    Args:
        image: (H, W, 3) uint8 array (used as is), PIL image or file path (converted to RGB, so
            grayscale, palette and RGBA files work, unlike in the reference).

    Returns:
        The RGB array.

    Raises:
        ValueError: An array that is not (H, W, 3) uint8.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {image.shape} {image.dtype}")
        return image
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))
    with Image.open(image) as pil:
        return np.array(pil.convert("RGB"))


def collect_result(
    out: GenerationOutput,
    b: int,
    masks: MaskOutput | None,
    *,
    tokenizer: GeoPixelTokenizer,
    hw: tuple[int, int],
    keep_logits: bool,
) -> GeoPixelResult:
    """Image ``b``'s result; masks are thresholded on the device and copied to the host as bools.

    The full-size logits (4 bytes a pixel per [SEG] on the device) are copied only when
    ``keep_logits``, as float16 (half the transfer; SAM-2 logits are small numbers, well inside
    its range), see :func:`half_logits`.

    Args:
        out: The batch's generation output.
        b: Row of the image in the batch.
        masks: Its selected SAM-2 masks, or None when it generated no [SEG].
        tokenizer: Decodes the answer.
        hw: (H, W) of the image.
        keep_logits: Copy the mask logits too.

    Returns:
        The result, all arrays on the host.
    """
    text = tokenizer.response_text(out.token_ids[b])
    logits: np.ndarray | None = None
    if masks is None:
        mask_arr, scores = np.zeros((0, *hw), np.bool_), np.zeros((0,), np.float32)
        if keep_logits:
            logits = np.zeros((0, *hw), np.float16)
    else:
        positive = masks.mask_logits > 0  # (n, H, W) bool, on the device
        mask_arr, scores = positive.cpu().numpy(), masks.iou.float().cpu().numpy()
        if keep_logits:
            logits = half_logits(masks.mask_logits, positive).cpu().numpy()
    return GeoPixelResult(
        text=text,
        phrases=parse_phrases(text, n_masks=out.seg_hidden[b].shape[0]),
        masks=mask_arr,
        scores=scores,
        token_ids=list(out.token_ids[b]),
        seg_hidden=out.seg_hidden[b].float().cpu().numpy(),
        mask_logits=logits,
    )


def half_logits(logits: Tensor, positive: Tensor) -> Tensor:
    """``logits`` in float16, positive values kept positive (so ``masks == mask_logits > 0``).

    Positive logits below half of float16's smallest subnormal (2**-24) would round to 0; they
    are stored as 2**-24 instead.

    Args:
        logits: (n, H, W) float logits.
        positive: ``logits > 0``.

    Returns:
        (n, H, W) float16, on the same device.
    """
    half = logits.to(torch.float16)
    return half.masked_fill_(positive & (half == 0), 2.0**-24)
