"""Write examples/scene.tif: a small synthetic georeferenced scene to try the CLI on.

A 1,000 x 800 px, 3-band uint8 GeoTIFF in UTM zone 33N (0.3 m pixels) showing a tiny
"town": fields, two roads, red-roofed buildings, round storage tanks, a pool, and a nodata
corner. Seeded, so the file is reproducible (< 1 MB with deflate + predictor).

    python examples/make_example_scene.py            # writes examples/scene.tif
    geopixel info examples/scene.tif
    geopixel describe examples/scene.tif -o town.gpkg --tile-size 500 --overlap 100
    geopixel segment examples/scene.tif "storage tanks" --top-k 5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

WIDTH, HEIGHT = 1000, 800


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency texture: bilinear upsampling of a coarse random grid, values in [0, 1]."""
    coarse = rng.random((cells + 1, cells + 1))
    ys = np.linspace(0, cells, shape[0])
    xs = np.linspace(0, cells, shape[1])
    y0, x0 = np.floor(ys).astype(int).clip(0, cells - 1), np.floor(xs).astype(int).clip(0, cells - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a, b = coarse[y0][:, x0], coarse[y0][:, x0 + 1]
    c, d = coarse[y0 + 1][:, x0], coarse[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def town(seed: int = 7) -> np.ndarray:
    """The scene as (3, H, W) uint8."""
    rng = np.random.default_rng(seed)
    t = _smooth_noise(rng, (HEIGHT, WIDTH), 6)
    rgb = np.stack([70 + 40 * t, 110 + 50 * t, 50 + 30 * t])  # fields
    rgb[:, 380:420, :] = 128  # east-west road
    rgb[:, :, 610:645] = 120  # north-south road
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    for _ in range(14):  # red roofs
        x0, y0 = int(rng.integers(20, 560)), int(rng.integers(20, 340))
        w, h = int(rng.integers(30, 70)), int(rng.integers(25, 50))
        rgb[:, y0 : y0 + h, x0 : x0 + w] = np.array([185, 60, 50])[:, None, None]
    for cx, cy in ((720, 480), (790, 480), (860, 480), (720, 560), (790, 560)):  # storage tanks
        disk = (xx - cx) ** 2 + (yy - cy) ** 2 < 28**2
        rgb[:, disk] = np.array([225, 225, 230])[:, None]
    pool = (np.abs(xx - 300) < 35) & (np.abs(yy - 600) < 18)
    rgb[:, pool] = np.array([40, 120, 210])[:, None]
    out = np.clip(rgb, 1, 255).astype(np.uint8)
    out[:, (xx + yy) > WIDTH + HEIGHT - 150] = 0  # nodata corner (bottom right)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the example scene.")
    parser.add_argument("output", nargs="?", type=Path, default=Path(__file__).with_name("scene.tif"))
    args = parser.parse_args()
    profile = {
        "driver": "GTiff",
        "width": WIDTH,
        "height": HEIGHT,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": Affine(0.3, 0, 455000.0, 0, -0.3, 5040000.0),
        "nodata": 0,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "predictor": 2,
        "photometric": "RGB",
    }
    with rasterio.open(args.output, "w", **profile) as dst:
        dst.write(town())
    print(f"{args.output}: {args.output.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
