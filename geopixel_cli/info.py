"""What ``geopixel info`` reports about a scene, without loading the model."""

from __future__ import annotations

from typing import Any

from geopixel_cli.raster import SceneInfo
from geopixel_cli.tiling import grid, grid_shape


def scene_summary(
    info: SceneInfo, *, tile_size: int, overlap: int, batch_size: int, min_valid: float
) -> dict[str, Any]:
    """What ``geopixel info`` reports: scene header, grid and the work it implies (no model).

    Args:
        info: The scene.
        tile_size: Tile window, pixels.
        overlap: Overlap, pixels.
        batch_size: Tiles per model call.
        min_valid: Skip threshold on the valid fraction of a tile.

    Returns:
        A JSON-safe dict.
    """
    from pyproj import CRS

    tiles = grid(info.width, info.height, tile_size=tile_size, overlap=overlap)
    crs = CRS.from_wkt(info.crs_wkt) if info.crs_wkt else None
    n_rows, n_cols = grid_shape(info.width, info.height, tile_size=tile_size, overlap=overlap)
    preview = info.valid_preview
    sy, sx = preview.shape[0] / info.height, preview.shape[1] / info.width
    skipped = 0
    for t in tiles:  # estimate from the decimated mask; the run decides on full-resolution pixels
        x0, y0, x1, y1 = t.window.bounds
        cut = preview[
            int(y0 * sy) : max(int(y1 * sy), int(y0 * sy) + 1),
            int(x0 * sx) : max(int(x1 * sx), int(x0 * sx) + 1),
        ]
        skipped += bool(cut.mean() < min_valid)
    return {
        "path": info.path,
        "width": info.width,
        "height": info.height,
        "count": info.count,
        "dtype": info.dtype,
        "bands_used": list(info.bidx),
        "nodata": info.nodata,
        "crs": crs.to_string() if crs else None,
        "crs_name": crs.name if crs else None,
        "pixel_size": list(info.pixel_size),
        "transform": list(info.transform),
        "stretch": None
        if info.stretch is None
        else {"low": list(info.stretch.low), "high": list(info.stretch.high)},
        "valid_fraction": round(info.valid_fraction, 4),
        "grid": {
            "tile_size": tile_size,
            "overlap": overlap,
            "rows": n_rows,
            "cols": n_cols,
            "tiles": len(tiles),
        },
        "work": {
            "model_calls_max": -(-(len(tiles) - skipped) // batch_size),
            "tiles_skipped_estimate": skipped,
            "batch_size": batch_size,
            "min_valid": min_valid,
        },
    }
