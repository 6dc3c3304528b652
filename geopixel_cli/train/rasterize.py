"""Polygon and RLE → binary masks, exactly as the reference data pipeline rasterises them.

The reference fills GeoPixelD polygons with OpenCV ``cv2.fillPoly`` (int32 points, 8-connected
lines, no shift), one call per polygon, OR-ed (DATASETS.md §1.5). OpenCV is not a dependency of
this project, so :func:`fill_polygon` re-implements that routine's integer arithmetic (the polygon
outline drawn with OpenCV's 8-connected line iterator, plus its scan-line fill over 16.16 fixed-point
edges); it reproduces the golden ground-truth masks pixel for pixel. COCO RLE goes through
pycocotools, as in the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_XY_SHIFT = 16
_XY_ONE = 1 << _XY_SHIFT


def _draw_line(mask: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> None:
    """OpenCV ``LineIterator`` (connectivity 8, left to right): set pixels on the segment."""
    height, width = mask.shape
    if x1 < x0:  # leftToRight: start from the leftmost end
        x0, y0, x1, y1 = x1, y1, x0, y0
    dx = x1 - x0
    dy = y1 - y0
    step_y = 1 if dy >= 0 else -1
    dy = abs(dy)
    y_major = dy > dx
    d_major, d_minor = (dy, dx) if y_major else (dx, dy)
    err = d_major - 2 * d_minor
    x, y = x0, y0
    for _ in range(d_major + 1):
        if 0 <= x < width and 0 <= y < height:
            mask[y, x] = 1
        minor = err < 0
        err += -2 * d_minor + (2 * d_major if minor else 0)
        if y_major:
            y += step_y
            x += 1 if minor else 0
        else:
            x += 1
            y += step_y if minor else 0


def _edges(points: np.ndarray, height: int) -> list[tuple[int, int, int, int]]:
    """Non-horizontal edges as (y0, y1, x_at_y0 in 16.16 fixed point, dx per row in 16.16)."""
    edges = []
    n = len(points)
    for i in range(n):
        xa, ya = (int(v) for v in points[i - 1])
        xb, yb = (int(v) for v in points[i])
        if ya == yb:
            continue
        fa, fb = xa << _XY_SHIFT, xb << _XY_SHIFT
        diff_x, diff_y = fb - fa, yb - ya
        # C integer division truncates toward zero.
        dx = abs(diff_x) // abs(diff_y) * (1 if (diff_x >= 0) == (diff_y >= 0) else -1)
        if ya < yb:
            y0, y1, x = ya, yb, fa
        else:
            y0, y1, x = yb, ya, fb
        edges.append((max(y0, 0), min(y1, height), x, dx))
    return edges


def fill_polygon(mask: np.ndarray, points: np.ndarray | Sequence[Sequence[int]]) -> None:
    """Fill one polygon into ``mask`` in place, like ``cv2.fillPoly(mask, [points], 1)``.

    Args:
        mask: (H, W) uint8 array, modified in place.
        points: (N, 2) integer ``[x, y]`` vertices (x = column, y = row), inside the image.
    """
    pts = np.asarray(points, dtype=np.int64).reshape(-1, 2)
    if len(pts) == 0:
        return
    height, width = mask.shape
    for i in range(len(pts)):
        xa, ya = pts[i - 1]
        xb, yb = pts[i]
        _draw_line(mask, int(xa), int(ya), int(xb), int(yb))
    edges = _edges(pts, height)
    if len(edges) < 2:
        return
    y_start = min(e[0] for e in edges)
    y_stop = min(max(e[1] for e in edges), height)
    y0s = np.array([e[0] for e in edges])
    y1s = np.array([e[1] for e in edges])
    xs = np.array([e[2] for e in edges], dtype=np.int64)
    dxs = np.array([e[3] for e in edges], dtype=np.int64)
    for y in range(max(y_start, 0), y_stop):
        active = (y0s <= y) & (y < y1s)
        if not active.any():
            continue
        cur = np.sort(xs[active] + (y - y0s[active]) * dxs[active])
        for left, right in zip(cur[0::2], cur[1::2], strict=False):
            x_lo = max(int(left) >> _XY_SHIFT, 0)
            x_hi = min(int(right) >> _XY_SHIFT, width - 1)
            if x_lo <= x_hi:
                mask[y, x_lo : x_hi + 1] = 1


def polygons_to_mask(polygons: Sequence[Sequence[Sequence[int]]], height: int, width: int) -> np.ndarray:
    """Rasterise the polygons of one mask (OR of the filled polygons, no holes).

    Args:
        polygons: List of polygons, each a list of ``[x, y]`` integer points.
        height: Image height.
        width: Image width.

    Returns:
        (H, W) uint8 mask with values {0, 1}.
    """
    mask = np.zeros((height, width), dtype=np.uint8)
    for poly in polygons:
        fill_polygon(mask, poly)
    return mask


def rle_to_mask(rle: dict, height: int, width: int) -> np.ndarray:
    """Decode one compressed COCO RLE (``{"size": [H, W], "counts": str}``) to an (H, W) uint8 mask.

    Args:
        rle: COCO RLE dict with compressed (string) counts.
        height: Expected image height.
        width: Expected image width.

    Returns:
        (H, W) uint8 mask.

    Raises:
        ValueError: The RLE is malformed, uncompressed, or its size differs from the image's.
    """
    from pycocotools import mask as mask_utils

    size = rle.get("size") if isinstance(rle, dict) else None
    counts = rle.get("counts") if isinstance(rle, dict) else None
    if not (isinstance(size, list) and len(size) == 2) or counts is None:
        raise ValueError("not a COCO RLE dict with 'size' [H, W] and 'counts'")
    if isinstance(counts, list):
        raise ValueError("uncompressed RLE (counts is a list); the reference decodes compressed RLE only")
    if [int(size[0]), int(size[1])] != [height, width]:
        raise ValueError(f"RLE size {size} differs from the image size [{height}, {width}]")
    enc = {
        "size": [int(size[0]), int(size[1])],
        "counts": counts.encode() if isinstance(counts, str) else counts,
    }
    return np.ascontiguousarray(mask_utils.decode(enc), dtype=np.uint8)


def mask_to_rle(mask: np.ndarray) -> dict:
    """Encode an (H, W) binary mask as compressed COCO RLE with string counts (JSON-ready).

    Args:
        mask: (H, W) array, non-zero = foreground.

    Returns:
        ``{"size": [H, W], "counts": str}``.
    """
    from pycocotools import mask as mask_utils

    enc = mask_utils.encode(np.asfortranarray((mask > 0).astype(np.uint8)))
    return {"size": [int(v) for v in enc["size"]], "counts": enc["counts"].decode("ascii")}
