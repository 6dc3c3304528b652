"""Raster side products: the instance-id mask (Cloud Optimized GeoTIFF) and the PNG quicklook.

Both are written block by block / from a decimated read, never from a full-size array, into a
hidden staging folder (:class:`geopixel_cli.layers.Staging`): renamed into place when complete,
or, with a caller's ``staging``, together with the run's other outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from geopixel_cli.layers import Staging
from geopixel_cli.raster import SceneInfo

MASK_BLOCK = 2048  # rows and columns rasterized at once (uint32: 16 MB)
PREVIEW_SIDE = 1024
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
]


def write_mask_raster(
    path: Path, info: SceneInfo, objects: list[Any], *, staging: Staging | None = None
) -> None:
    """Write a uint32 COG on the scene's grid: pixel value = ``object_id`` (0 = no object).

    Args:
        path: Output ``.tif``.
        info: The scene (size, CRS, transform).
        objects: ``OutputObject`` list in ``object_id`` order (ids start at 1).
        staging: Only stage the file there (the caller commits); None: write it in place now.
    """
    if staging is None:
        with Staging(path) as own:
            write_mask_raster(path, info, objects, staging=own)
            own.commit()
        return
    import rasterio.shutil

    cog = staging.path(path)
    plain = cog.with_name(f".{cog.name}.plain.tif")
    try:
        _write_plain_mask(plain, info, objects)
        rasterio.shutil.copy(
            plain, cog, driver="COG", compress="DEFLATE", overview_resampling="nearest", BIGTIFF="IF_SAFER"
        )
    finally:
        plain.unlink(missing_ok=True)


def _write_plain_mask(path: Path, info: SceneInfo, objects: list[Any]) -> None:
    """The id raster as a tiled GeoTIFF, rasterized ``MASK_BLOCK`` x ``MASK_BLOCK`` at a time."""
    import rasterio
    from affine import Affine
    from rasterio.features import rasterize
    from rasterio.windows import Window
    from shapely import STRtree
    from shapely.geometry import box

    geoms = [o.merged.geometry for o in objects]
    tree = STRtree(geoms) if geoms else None
    profile = {
        "driver": "GTiff",
        "width": info.width,
        "height": info.height,
        "count": 1,
        "dtype": "uint32",
        "crs": info.crs_wkt,
        "transform": Affine(*info.transform),
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }
    with rasterio.open(path, "w", **profile) as dst:
        for y in range(0, info.height, MASK_BLOCK):
            for x in range(0, info.width, MASK_BLOCK):
                h, w = min(MASK_BLOCK, info.height - y), min(MASK_BLOCK, info.width - x)
                block = np.zeros((h, w), np.uint32)
                hits = tree.query(box(x, y, x + w, y + h)) if tree is not None else []
                if len(hits):
                    shapes = [(geoms[i], i + 1) for i in sorted(hits)]
                    block = rasterize(
                        shapes, out_shape=(h, w), transform=Affine.translation(x, y), dtype="uint32"
                    )
                dst.write(block, 1, window=Window(x, y, w, h))


def _quicklook(info: SceneInfo, side: int) -> tuple[np.ndarray, float]:
    """(h, w, 3) uint8 decimated RGB of the scene with its stretch, and the scale factor."""
    import rasterio
    from rasterio.enums import Resampling

    scale = min(1.0, side / max(info.width, info.height))
    h, w = max(1, round(info.height * scale)), max(1, round(info.width * scale))
    with rasterio.open(info.path) as ds:
        data = ds.read(list(info.bidx), out_shape=(3, h, w), resampling=Resampling.average)
        valid = ds.read_masks(list(info.bidx), out_shape=(3, h, w)).min(axis=0) > 0
    rgb = info.stretch.apply(data) if info.stretch is not None else data.astype(np.uint8)
    return np.where(valid[None], rgb, 0).transpose(1, 2, 0), scale


def write_preview(
    path: Path,
    info: SceneInfo,
    objects: list[Any],
    *,
    side: int = PREVIEW_SIDE,
    staging: Staging | None = None,
) -> None:
    """Write a PNG quicklook: decimated scene, translucent object masks, category labels.

    Args:
        path: Output ``.png``.
        info: The scene.
        objects: ``OutputObject`` list.
        side: Longest side of the quicklook, pixels.
        staging: Only stage the file there (the caller commits); None: write it in place now.
    """
    if staging is None:
        with Staging(path) as own:
            write_preview(path, info, objects, side=side, staging=own)
            own.commit()
        return
    from PIL import Image, ImageDraw, ImageFont
    from shapely import get_parts

    rgb, scale = _quicklook(info, side)
    base = Image.fromarray(rgb).convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    colours: dict[str, tuple[int, int, int]] = {}
    font = ImageFont.load_default()
    for out in objects:
        colour = colours.setdefault(out.merged.category, PALETTE[len(colours) % len(PALETTE)])
        for part in get_parts(out.merged.geometry):
            ring = [(x * scale, y * scale) for x, y in part.exterior.coords]
            draw.polygon(ring, fill=(*colour, 110), outline=(*colour, 255))
    _draw_labels(draw, base.size, objects, colours, scale, font)
    Image.alpha_composite(base, overlay).convert("RGB").save(staging.path(path), format="PNG")


def _draw_labels(
    draw: Any,
    size: tuple[int, int],
    objects: list[Any],
    colours: dict[str, tuple[int, int, int]],
    scale: float,
    font: Any,
) -> None:
    """Category labels, biggest objects first, skipping any label that would overlap a drawn one."""
    taken = np.zeros((size[1] // 4 + 1, size[0] // 4 + 1), bool)  # 4 px occupancy grid
    for out in sorted(objects, key=lambda o: -o.merged.geometry.area):
        point = out.merged.geometry.representative_point()
        text = out.merged.category
        x0, y0, x1, y1 = draw.textbbox((point.x * scale, point.y * scale), text, font=font, stroke_width=1)
        cells = taken[max(0, int(y0) // 4) : int(y1) // 4 + 1, max(0, int(x0) // 4) : int(x1) // 4 + 1]
        if cells.size == 0 or cells.any():
            continue
        cells[:] = True
        colour = colours[out.merged.category]
        draw.text(
            (point.x * scale, point.y * scale),
            text,
            fill=(*colour, 255),
            font=font,
            stroke_width=1,
            stroke_fill=(0, 0, 0, 255),
        )
