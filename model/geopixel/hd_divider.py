"""Adaptive image divider ("HD transform"): crop grid, resize + white padding, CLIP crops.

Reproduces the reference's two transforms (ARCHITECTURE.md §3):

* ``rule="inference"`` = IXC-2.5 ``Image_transform``: column count
  ``s = max(floor(W / 560), s_budget)``, padding at the bottom only;
* ``rule="training"`` = ``R560_HD18_Identity_transform``: ``s = min(ceil(1.5 W / 560), s_budget)``,
  centred padding.

Both transpose portrait images first (so the long side is the width), resize to
``(s·560, int(s·560 / ratio))`` with PIL bilinear (antialiased when downscaling; PIL resamples in
two uint8 passes, so it is used here rather than re-implemented, for byte-exact canvases), pad the
height to a multiple of 560 with white and transpose back. ``normalize_clip`` and
``crops_for_clip`` then build the CLIP input: a bicubic 560×560 global view of the normalized
canvas followed by the tiles in row-major order (§4.1).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Rule = Literal["inference", "training"]

TILE = 560
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grid:
    """Where an image lands on the padded canvas, in the image's own orientation.

    Attributes:
        rows: Tile rows ``h`` of the canvas.
        cols: Tile columns ``w`` of the canvas.
        width: Width of the resized image content in pixels (before padding).
        height: Height of the resized image content in pixels (before padding).
        pad_top: White rows above the content.
        pad_bottom: White rows below the content.
        pad_left: White columns left of the content.
        pad_right: White columns right of the content.
        transposed: The image was portrait (W < H) and was divided transposed, so the padding
            lies left/right instead of top/bottom.
        downscaled: ``max_tiles`` reduced the grid the rule would have chosen (the image is
            resized onto a smaller canvas than the reference would use).
        tile: Tile side in pixels (560).
    """

    rows: int
    cols: int
    width: int
    height: int
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int
    transposed: bool
    downscaled: bool = False
    tile: int = TILE

    @property
    def num_tiles(self) -> int:
        """Number of sub-crops ``h·w`` (the global view not counted)."""
        return self.rows * self.cols

    @property
    def canvas_width(self) -> int:
        """Padded canvas width (``cols · tile``)."""
        return self.cols * self.tile

    @property
    def canvas_height(self) -> int:
        """Padded canvas height (``rows · tile``)."""
        return self.rows * self.tile


def budget_scale(ratio: float, hd_num: int) -> int:
    """Largest column count ``s`` with ``s · ceil(s / ratio) <= hd_num`` (the reference's loop).

    Args:
        ratio: Long side over short side (>= 1).
        hd_num: Crop budget.

    Returns:
        The budget column count (0 only when ``hd_num < 1``).
    """
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    return scale - 1


def _rule_scale(long_side: int, ratio: float, hd_num: int, rule: Rule, tile: int) -> int:
    budget = budget_scale(ratio, hd_num)
    if rule == "inference":
        # The budget is only a lower bound: wide images keep about their native width.
        return max(math.floor(long_side / tile), budget)
    if rule == "training":
        return min(math.ceil(long_side * 1.5 / tile), budget)
    raise ValueError(f"unknown rule {rule!r}; expected 'inference' or 'training'")


def _content_short(scale: int, ratio: float, tile: int) -> int:
    # int() truncation as in the reference: 1000x600 at width 560 gives 335, not 336. The max(1, .)
    # only guards degenerate inputs (ratio > 560·s) on which the reference itself fails.
    return max(1, int(int(scale * tile) / ratio))


def _tiles(scale: int, ratio: float, tile: int) -> int:
    return scale * math.ceil(_content_short(scale, ratio, tile) / tile)


def plan_grid(
    width: int,
    height: int,
    hd_num: int,
    *,
    rule: Rule,
    max_tiles: int | None = None,
    downscale: bool = True,
    tile: int = TILE,
) -> Grid:
    """Choose the tile grid, resized size and padding for one image.

    ``max_tiles`` bounds the context an image can take. The inference rule takes
    ``max(floor(W/560), budget)`` columns, so a large image gives many crops whatever ``hd_num``
    (a 4000×3000 image gives 6×7 = 42). When the rule's grid has more than ``max_tiles`` tiles,
    the rule is re-run with the budget ``min(hd_num, max_tiles)`` and the column count is then
    lowered one by one until the grid fits; the image is still resized once (straight onto the
    smaller canvas, no double resampling) and the returned grid has ``downscaled=True``. With
    ``downscale=False`` a too-large grid raises instead. Grids within the cap are untouched, so
    results equal the reference's whenever the cap is not hit.

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        hd_num: Crop budget (9 at GeoPixel inference and training, 1 for the RES fine-tune).
        rule: ``"inference"`` (``Image_transform``) or ``"training"`` (``R560_HD18_Identity``).
        max_tiles: Optional cap on ``rows · cols``.
        downscale: When the cap is hit, shrink the grid (True) or raise (False).
        tile: Tile side in pixels.

    Returns:
        The grid, in the image's orientation.

    Raises:
        ValueError: Bad sizes or ``hd_num``/``max_tiles`` < 1, unknown rule, or the cap is hit
            with ``downscale=False``.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if hd_num < 1 or (max_tiles is not None and max_tiles < 1):
        raise ValueError(f"hd_num ({hd_num}) and max_tiles ({max_tiles}) must be >= 1")
    transposed = width < height
    long_side, short_side = (height, width) if transposed else (width, height)
    ratio = long_side / short_side
    scale = _rule_scale(long_side, ratio, hd_num, rule, tile)
    downscaled = False
    if max_tiles is not None and _tiles(scale, ratio, tile) > max_tiles:
        if not downscale:
            raise ValueError(
                f"a {width}x{height} image gives {_tiles(scale, ratio, tile)} tiles at hd_num {hd_num} "
                f"({rule} rule), more than max_tiles={max_tiles}; allow downscaling or lower hd_num"
            )
        scale = _rule_scale(long_side, ratio, min(hd_num, max_tiles), rule, tile)
        while scale > 1 and _tiles(scale, ratio, tile) > max_tiles:
            scale -= 1
        downscaled = True
        logger.info(
            "%dx%d image downscaled to %d tile columns to fit max_tiles=%d", width, height, scale, max_tiles
        )
    return _make_grid(scale, ratio, rule=rule, transposed=transposed, downscaled=downscaled, tile=tile)


def _make_grid(
    scale: int, ratio: float, *, rule: Rule, transposed: bool, downscaled: bool, tile: int
) -> Grid:
    # Planned on the landscape view (long side = width); swapped back for portrait images.
    new_long, new_short = int(scale * tile), _content_short(scale, ratio, tile)
    short_tiles = math.ceil(new_short / tile)
    pad = short_tiles * tile - new_short
    before = pad // 2 if rule == "training" else 0  # training centres, inference pads the end
    long_axis = {"width": new_long, "pad_start": 0, "pad_end": 0}
    short_axis = {"width": new_short, "pad_start": before, "pad_end": pad - before}
    x_axis, y_axis = (short_axis, long_axis) if transposed else (long_axis, short_axis)
    return Grid(
        rows=scale if transposed else short_tiles,
        cols=short_tiles if transposed else scale,
        width=x_axis["width"],
        height=y_axis["width"],
        pad_top=y_axis["pad_start"],
        pad_bottom=y_axis["pad_end"],
        pad_left=x_axis["pad_start"],
        pad_right=x_axis["pad_end"],
        transposed=transposed,
        downscaled=downscaled,
        tile=tile,
    )


def apply_grid(image: np.ndarray, grid: Grid) -> np.ndarray:
    """Resize ``image`` as ``grid`` says (PIL bilinear) and pad it with white.

    Portrait images are transposed before the resize and back after it, as the reference does
    (PIL resamples in two uint8-rounded passes, so the order matters for exact pixels).

    Args:
        image: RGB image ``(H, W, 3)`` uint8.
        grid: Plan from :func:`plan_grid` for this image's size.

    Returns:
        The padded canvas ``(rows·tile, cols·tile, 3)`` uint8.
    """
    _check_rgb(image)
    work = np.ascontiguousarray(image.transpose(1, 0, 2)) if grid.transposed else image
    size = (grid.height, grid.width) if grid.transposed else (grid.width, grid.height)  # PIL (w, h)
    resized = np.asarray(Image.fromarray(work).resize(size, Image.Resampling.BILINEAR))  # (h', w', 3)
    if grid.transposed:
        resized = resized.transpose(1, 0, 2)  # back to the image's orientation
    canvas = np.full((grid.canvas_height, grid.canvas_width, 3), 255, dtype=np.uint8)
    canvas[grid.pad_top : grid.pad_top + grid.height, grid.pad_left : grid.pad_left + grid.width] = resized
    return canvas


def hd_transform(
    image: np.ndarray,
    hd_num: int,
    *,
    rule: Rule = "inference",
    max_tiles: int | None = None,
    downscale: bool = True,
) -> np.ndarray:
    """Resize + pad an image onto its tile canvas (before normalization).

    Args:
        image: RGB image ``(H, W, 3)`` uint8.
        hd_num: Crop budget.
        rule: ``"inference"`` or ``"training"`` (see :func:`plan_grid`).
        max_tiles: Optional cap on the number of tiles (see :func:`plan_grid`).
        downscale: When the cap is hit, shrink the grid (True) or raise ValueError (False).

    Returns:
        The padded canvas ``(h·560, w·560, 3)`` uint8. Use :func:`plan_grid` + :func:`apply_grid`
        to also get the :class:`Grid` (and its ``downscaled`` flag).
    """
    _check_rgb(image)
    grid = plan_grid(
        image.shape[1], image.shape[0], hd_num, rule=rule, max_tiles=max_tiles, downscale=downscale
    )
    return apply_grid(image, grid)


def normalize_clip(canvas: np.ndarray) -> torch.Tensor:
    """``ToTensor`` + CLIP ``Normalize`` of a uint8 canvas, in float32 like torchvision.

    Args:
        canvas: RGB canvas ``(H, W, 3)`` uint8.

    Returns:
        ``(3, H, W)`` float32; white padding becomes ``(1 - mean) / std``.
    """
    _check_rgb(canvas)
    x = torch.from_numpy(np.ascontiguousarray(canvas)).permute(2, 0, 1)  # (3, H, W)
    x = x.to(torch.float32).div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return x.sub(mean).div(std)


def crops_for_clip(normalized: torch.Tensor, grid: Grid | None = None, *, tile: int = TILE) -> torch.Tensor:
    """Global view + row-major tiles of a normalized canvas: the CLIP batch of one image.

    Args:
        normalized: ``(3, h·tile, w·tile)`` output of :func:`normalize_clip`.
        grid: Optional plan, checked against the tensor's shape.
        tile: Tile side in pixels.

    Returns:
        ``(1 + h·w, 3, tile, tile)`` float32: ``[global, tile(0,0), tile(0,1), ...]``. The global
        view is a bicubic resize (align_corners False, no antialias, no clamping) of the whole
        normalized canvas.
    """
    c, height, width = normalized.shape
    if height % tile or width % tile:
        raise ValueError(f"canvas {width}x{height} is not a multiple of the {tile}-px tile")
    rows, cols = height // tile, width // tile
    if grid is not None and (grid.rows, grid.cols) != (rows, cols):
        raise ValueError(f"grid {grid.rows}x{grid.cols} does not match the canvas' {rows}x{cols} tiles")
    x = normalized.float()
    tiles = x.reshape(c, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(rows * cols, c, tile, tile)
    glb = F.interpolate(x[None], size=(tile, tile), mode="bicubic", align_corners=False)  # (1, 3, tile, tile)
    return torch.cat([glb, tiles], dim=0)  # (1 + h·w, 3, tile, tile)


def image_token_count(rows: int, cols: int, *, merged_grid: int = 20) -> int:
    """Length of one image's token sequence (ARCHITECTURE.md §4.2).

    Global ``g`` rows of ``g`` tokens + a separator, one global separator, then ``g·rows`` rows of
    ``g·cols`` tokens + a separator: ``(h·w + 1)·g² + 1 + (h + 1)·g``.

    Args:
        rows: Tile rows ``h``.
        cols: Tile columns ``w``.
        merged_grid: Merged tokens per crop side ``g`` (20 for 560 px, patch 14, 2×2 merge).

    Returns:
        The number of image tokens (4081 for 3×3 at ``g = 20``).
    """
    g = merged_grid
    return (rows * cols + 1) * g * g + 1 + (rows + 1) * g


def _check_rgb(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected an (H, W, 3) uint8 RGB array, got shape {image.shape} dtype {image.dtype}"
        )
