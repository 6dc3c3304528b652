"""Tile grid over a scene: fixed-size windows with overlap, the last row and column snapped inside.

Pure functions, no I/O. Every tile also carries a *core*: the cores of all tiles partition the
scene (the seam between two overlapping tiles runs through the middle of their overlap), so each
scene pixel has exactly one owner tile. Seam merging (``merge.py``) uses the cores to decide which
tile's prediction wins where tiles overlap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PixelWindow:
    """A rectangle in scene pixel coordinates (columns x, rows y), half-open.

    Attributes:
        col_off: First column.
        row_off: First row.
        width: Number of columns.
        height: Number of rows.
    """

    col_off: int
    row_off: int
    width: int
    height: int

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """``(xmin, ymin, xmax, ymax)`` in scene pixels."""
        return (self.col_off, self.row_off, self.col_off + self.width, self.row_off + self.height)

    def intersection(self, other: PixelWindow) -> PixelWindow | None:
        """The overlap of two windows, or None when they do not overlap."""
        x0, y0 = max(self.col_off, other.col_off), max(self.row_off, other.row_off)
        x1 = min(self.col_off + self.width, other.col_off + other.width)
        y1 = min(self.row_off + self.height, other.row_off + other.height)
        if x1 <= x0 or y1 <= y0:
            return None
        return PixelWindow(x0, y0, x1 - x0, y1 - y0)


@dataclass(frozen=True)
class TileSpec:
    """One tile of the grid.

    Attributes:
        tile_id: Row-major index (``row * n_cols + col``), stable across runs with the same grid.
        row: Grid row.
        col: Grid column.
        window: The pixels the model sees.
        core: The pixels this tile owns; the cores of a grid partition the scene.
    """

    tile_id: int
    row: int
    col: int
    window: PixelWindow
    core: PixelWindow


def tile_count(size: int, tile: int, stride: int) -> int:
    """Number of tiles along one axis: ``ceil((size - tile) / stride) + 1`` (1 when the tile covers it).

    Args:
        size: Scene size along the axis, pixels (> 0).
        tile: Tile size, pixels (> 0).
        stride: Tile size minus overlap, pixels (> 0).

    Returns:
        The tile count.
    """
    if size <= tile:
        return 1
    return math.ceil((size - tile) / stride) + 1


def axis_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Window and core spans along one axis.

    The last window is snapped back inside the scene (it then overlaps its neighbour by more
    than ``overlap``) so the model never sees padding; scenes smaller than a tile give one
    window of the scene's size. Core boundaries sit in the middle of each overlap.

    Args:
        size: Scene size along the axis, pixels.
        tile: Tile size, pixels.
        overlap: Overlap between neighbouring windows, pixels (``0 <= overlap < tile``).

    Returns:
        One ``(start, stop, core_start, core_stop)`` per tile, in order.
    """
    if size <= 0 or tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"invalid grid: size={size} tile={tile} overlap={overlap}")
    length = min(tile, size)
    n = tile_count(size, tile, tile - overlap)
    starts = [min(i * (tile - overlap), size - length) for i in range(n)]
    stops = [s + length for s in starts]
    # Core boundary between tile i-1 and i: the middle of their overlap.
    cuts = [0] + [(starts[i] + stops[i - 1]) // 2 for i in range(1, n)] + [size]
    return [(starts[i], stops[i], cuts[i], cuts[i + 1]) for i in range(n)]


def grid(width: int, height: int, *, tile_size: int, overlap: int) -> list[TileSpec]:
    """The tile grid of a ``width`` x ``height`` scene, row-major.

    Args:
        width: Scene width, pixels.
        height: Scene height, pixels.
        tile_size: Window size, pixels (windows are square unless the scene is smaller).
        overlap: Overlap between neighbouring windows, pixels.

    Returns:
        The tiles; their windows cover every pixel and lie inside the scene, their cores
        partition it.
    """
    xs = axis_spans(width, tile_size, overlap)
    ys = axis_spans(height, tile_size, overlap)
    tiles = []
    for r, (y0, y1, cy0, cy1) in enumerate(ys):
        for c, (x0, x1, cx0, cx1) in enumerate(xs):
            tiles.append(
                TileSpec(
                    tile_id=r * len(xs) + c,
                    row=r,
                    col=c,
                    window=PixelWindow(x0, y0, x1 - x0, y1 - y0),
                    core=PixelWindow(cx0, cy0, cx1 - cx0, cy1 - cy0),
                )
            )
    return tiles


def grid_shape(width: int, height: int, *, tile_size: int, overlap: int) -> tuple[int, int]:
    """``(n_rows, n_cols)`` of the grid without building it."""
    stride = tile_size - overlap
    return tile_count(height, tile_size, stride), tile_count(width, tile_size, stride)
