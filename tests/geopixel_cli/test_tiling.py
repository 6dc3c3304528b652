import itertools
import random

import numpy as np
import pytest

from geopixel_cli.tiling import PixelWindow, axis_spans, grid, grid_shape, tile_count


def _cases():
    rng = random.Random(1234)
    fixed = [
        (800, 800, 100),
        (799, 800, 100),
        (801, 800, 100),
        (1500, 800, 100),
        (517, 200, 40),
        (433, 200, 40),
        (1, 800, 0),
        (10, 32, 16),
        (2000, 800, 0),
        (1600, 800, 400),
        (20000, 800, 100),
    ]
    rand = []
    for _ in range(300):
        tile = rng.randint(1, 300)
        rand.append((rng.randint(1, 2000), tile, rng.randint(0, tile - 1)))
    return fixed + rand


@pytest.mark.parametrize("size,tile,overlap", _cases())
def test_axis_spans_cover_snap_and_partition(size, tile, overlap):
    spans = axis_spans(size, tile, overlap)
    covered = np.zeros(size, int)
    owned = np.zeros(size, int)
    for start, stop, c0, c1 in spans:
        assert 0 <= start < stop <= size  # inside the scene, never padding
        assert stop - start == min(tile, size)
        assert start <= c0 < c1 <= stop  # the core is inside its window
        covered[start:stop] += 1
        owned[c0:c1] += 1
    assert covered.min() >= 1  # every pixel is seen
    assert (owned == 1).all()  # cores partition the axis
    assert len(spans) == tile_count(size, tile, tile - overlap)
    starts = [s[0] for s in spans]
    assert starts == sorted(set(starts))
    if len(spans) > 1:
        assert spans[-1][1] == size  # the last window is snapped to the edge
        steps = np.diff(starts)
        assert (steps[:-1] == tile - overlap).all() and 0 < steps[-1] <= tile - overlap


def test_tile_count_formula():
    # ceil((size - tile) / stride) + 1
    assert tile_count(517, 200, 160) == 3
    assert tile_count(20000, 800, 700) == 29
    assert tile_count(800, 800, 700) == 1
    assert tile_count(100, 800, 700) == 1


@pytest.mark.parametrize(
    "width,height,tile,overlap", [(517, 433, 200, 40), (100, 50, 800, 100), (1601, 799, 400, 0)]
)
def test_grid_covers_scene_and_cores_partition_it(width, height, tile, overlap):
    tiles = grid(width, height, tile_size=tile, overlap=overlap)
    rows, cols = grid_shape(width, height, tile_size=tile, overlap=overlap)
    assert len(tiles) == rows * cols
    assert [t.tile_id for t in tiles] == list(range(len(tiles)))
    seen = np.zeros((height, width), int)
    owned = np.zeros((height, width), int)
    for t in tiles:
        x0, y0, x1, y1 = t.window.bounds
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        seen[y0:y1, x0:x1] += 1
        cx0, cy0, cx1, cy1 = t.core.bounds
        owned[cy0:cy1, cx0:cx1] += 1
        assert t.tile_id == t.row * cols + t.col
    assert seen.min() >= 1
    assert (owned == 1).all()


def test_window_intersection():
    a, b = PixelWindow(0, 0, 200, 200), PixelWindow(160, 160, 200, 200)
    assert a.intersection(b) == PixelWindow(160, 160, 40, 40)
    assert a.intersection(PixelWindow(200, 0, 10, 10)) is None


@pytest.mark.parametrize("size,tile,overlap", [(0, 800, 100), (100, 0, 0), (100, 50, 50), (100, 50, -1)])
def test_invalid_grid_raises(size, tile, overlap):
    with pytest.raises(ValueError):
        axis_spans(size, tile, overlap)


def test_grid_is_pure():
    assert grid(999, 777, tile_size=300, overlap=50) == grid(999, 777, tile_size=300, overlap=50)
    assert all(
        isinstance(v, int)
        for t in grid(999, 777, tile_size=300, overlap=50)
        for v in itertools.chain(t.window.bounds, t.core.bounds)
    )
