"""Scene access: open and validate, band selection, one scene-level stretch, nodata, window reads.

Only windowed (or decimated) reads: the scene is never held in memory. A dataset handle is
not thread-safe, so every reader thread opens its own :class:`SceneReader`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geopixel_cli.errors import UserError
from geopixel_cli.tiling import PixelWindow

SUPPORTED_DTYPES = ("uint8", "uint16", "int16", "float32")
STRETCH_PERCENTILES = (2.0, 98.0)
DECIMATED_SIDE = 1024  # longest side of the read that estimates stretch and valid fraction


@dataclass(frozen=True)
class Stretch:
    """Per-band linear map to uint8: ``(x - low) / (high - low) * 255``, clipped.

    Attributes:
        low: (C,) value mapped to 0, one per selected band.
        high: (C,) value mapped to 255.
    """

    low: tuple[float, ...]
    high: tuple[float, ...]

    def apply(self, data: np.ndarray) -> np.ndarray:
        """Stretch ``(C, H, W)`` band data to ``(C, H, W)`` uint8."""
        low = np.asarray(self.low, np.float32)[:, None, None]
        span = np.maximum(np.asarray(self.high, np.float32)[:, None, None] - low, 1e-6)
        out = (data.astype(np.float32) - low) * (255.0 / span)
        return np.clip(np.nan_to_num(out, nan=0.0), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class SceneInfo:
    """What the pipeline needs to know about a scene, read once from its header and a decimated read.

    Attributes:
        path: The scene path as given.
        width: Columns.
        height: Rows.
        count: Number of bands in the file.
        dtype: Band dtype name.
        bidx: The 1-based bands used as R, G, B (one band is repeated three times).
        crs_wkt: The CRS as WKT, or None when the scene has none.
        transform: The affine pixel-to-CRS transform as 6 GDAL-order-free coefficients ``(a, b, c, d, e, f)``.
        nodata: The nodata value of the first selected band, or None.
        stretch: The scene-level stretch, or None for uint8 scenes (used as is).
        valid_fraction: Fraction of valid pixels estimated from the decimated read.
        valid_preview: (h, w) bool valid mask of the decimated read (at most 1024 px a side).
    """

    path: str
    width: int
    height: int
    count: int
    dtype: str
    bidx: tuple[int, ...]
    crs_wkt: str | None
    transform: tuple[float, float, float, float, float, float]
    nodata: float | None
    stretch: Stretch | None
    valid_fraction: float
    valid_preview: np.ndarray = field(
        default_factory=lambda: np.ones((1, 1), bool), compare=False, repr=False
    )

    @property
    def pixel_size(self) -> tuple[float, float]:
        """``(x, y)`` pixel size in CRS units (positive)."""
        a, _, _, _, e, _ = self.transform
        return abs(a), abs(e)


def parse_bidx(text: str | None) -> tuple[int, ...] | None:
    """Parse ``-b/--bidx`` (``"3,2,1"`` or ``"1"``) into 1-based band indexes.

    Args:
        text: The option value, or None.

    Returns:
        The indexes, or None when not given.

    Raises:
        UserError: When the value is not a comma-separated list of 1 or 3 positive integers.
    """
    if text is None or not text.strip():
        return None
    try:
        bands = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--bidx must be 1 or 3 comma-separated band numbers, got {text!r}") from None
    if len(bands) not in (1, 3) or min(bands) < 1:
        raise UserError(f"--bidx must be 1 or 3 band numbers (1-based), got {text!r}")
    return bands


def default_bidx(count: int, requested: tuple[int, ...] | None) -> tuple[int, ...]:
    """Bands used as RGB: the request, else 1,2,3 (3+ bands) or band 1 repeated (1-2 bands).

    Args:
        count: Bands in the file.
        requested: Bands asked for with ``-b``, or None.

    Returns:
        Three 1-based band indexes.

    Raises:
        UserError: When a requested band does not exist.
    """
    if requested is not None:
        missing = [b for b in requested if b > count]
        if missing:
            raise UserError(f"band {missing[0]} requested with --bidx but the scene has {count} band(s)")
        return requested * 3 if len(requested) == 1 else requested
    return (1, 2, 3) if count >= 3 else (1, 1, 1)


def gdal_message(exc: BaseException) -> str:
    """The most specific first line in an exception chain (rasterio wraps GDAL's own message)."""
    lines: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(lines) < 8:
        text = str(current).strip()
        if text and "see previous exception" not in text.lower():
            lines.append(text.splitlines()[0])
        current = current.__cause__ or current.__context__
    return lines[-1] if lines else type(exc).__name__


def _open(path: str) -> Any:
    import rasterio
    from rasterio.errors import RasterioIOError

    if not Path(path).exists() and "://" not in path and not path.startswith("/vsi"):
        raise UserError(f"scene not found: {path}")
    try:
        return rasterio.open(path)
    except RasterioIOError as exc:
        raise UserError(f"cannot open {path} as a raster: {gdal_message(exc)}") from exc


def _check_header(ds: Any, path: str) -> None:
    if ds.width == 0 or ds.height == 0 or ds.count == 0:
        raise UserError(f"{path} is empty ({ds.width}x{ds.height} pixels, {ds.count} bands)")
    dtype = ds.dtypes[0]
    if dtype not in SUPPORTED_DTYPES:
        raise UserError(f"{path} has dtype {dtype}; supported: {', '.join(SUPPORTED_DTYPES)}")
    t = ds.transform
    if abs(t.b) > 1e-12 * abs(t.a) or abs(t.d) > 1e-12 * abs(t.e):
        raise UserError(
            f"{path} has a rotated or sheared geotransform; warp it north-up first "
            f"(gdalwarp {path} north_up.tif)"
        )


def decimated_read(ds: Any, bidx: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Read the whole extent at most ``DECIMATED_SIDE`` px on its longest side (uses overviews).

    Args:
        ds: An open rasterio dataset.
        bidx: 1-based bands to read.

    Returns:
        ``(data (C, h, w), valid (h, w) bool)``.
    """
    from rasterio.enums import Resampling

    scale = min(1.0, DECIMATED_SIDE / max(ds.width, ds.height))
    h, w = max(1, round(ds.height * scale)), max(1, round(ds.width * scale))
    data = ds.read(list(bidx), out_shape=(len(bidx), h, w), resampling=Resampling.nearest)
    masks = ds.read_masks(list(bidx), out_shape=(len(bidx), h, w), resampling=Resampling.nearest)
    valid = masks.min(axis=0) > 0
    if data.dtype.kind == "f":
        valid &= np.isfinite(data).all(axis=0)
    return data, valid


def scene_stretch(data: np.ndarray, valid: np.ndarray) -> Stretch:
    """Per-band percentile stretch from a decimated read, over valid pixels only.

    Args:
        data: (C, h, w) band values.
        valid: (h, w) bool.

    Returns:
        The scene-level :class:`Stretch` (2nd to 98th percentile per band).
    """
    lows, highs = [], []
    for band in data:
        values = band[valid].astype(np.float64)
        lo, hi = np.percentile(values, STRETCH_PERCENTILES) if values.size else (0.0, 1.0)
        lows.append(float(lo))
        highs.append(float(hi) if hi > lo else float(lo) + 1.0)
    return Stretch(tuple(lows), tuple(highs))


def open_scene(path: str, *, bidx: tuple[int, ...] | None = None) -> SceneInfo:
    """Open and validate a scene; compute its stretch and valid fraction from one decimated read.

    Args:
        path: Anything GDAL opens.
        bidx: Requested bands (``-b``), or None for the default.

    Returns:
        The scene's :class:`SceneInfo`.

    Raises:
        UserError: Missing file, not a raster, truncated file, zero size, unsupported dtype,
            rotated or sheared transform, missing band, or no valid pixel at all.
    """
    from rasterio.errors import RasterioIOError

    with _open(path) as ds:
        _check_header(ds, path)
        bands = default_bidx(ds.count, bidx)
        try:
            data, valid = decimated_read(ds, bands)
        except RasterioIOError as exc:
            raise UserError(f"cannot read {path} (truncated or corrupt?): {gdal_message(exc)}") from exc
        if not valid.any():
            raise UserError(f"{path} has no valid pixel: every pixel is nodata")
        t = ds.transform
        nodata = ds.nodatavals[bands[0] - 1]
        return SceneInfo(
            path=path,
            width=ds.width,
            height=ds.height,
            count=ds.count,
            dtype=ds.dtypes[0],
            bidx=bands,
            crs_wkt=ds.crs.to_wkt() if ds.crs else None,
            transform=(t.a, t.b, t.c, t.d, t.e, t.f),
            nodata=None if nodata is None or (isinstance(nodata, float) and math.isnan(nodata)) else nodata,
            stretch=None if ds.dtypes[0] == "uint8" else scene_stretch(data, valid),
            valid_fraction=float(valid.mean()),
            valid_preview=valid,
        )


@dataclass
class TileData:
    """Pixels of one tile ready for the model.

    Attributes:
        rgb: (H, W, 3) uint8; nodata pixels are black.
        valid: (H, W) bool, False on nodata.
    """

    rgb: np.ndarray
    valid: np.ndarray


class SceneReader:
    """Windowed reads of a scene's selected bands as uint8 RGB. One per thread.

    Args:
        info: The scene, as :func:`open_scene` returned it.
    """

    def __init__(self, info: SceneInfo) -> None:
        self.info = info
        self._ds: Any = None

    def read(self, window: PixelWindow) -> TileData:
        """Read one window.

        Args:
            window: Scene pixels to read (inside the scene).

        Returns:
            The tile's RGB and valid mask.
        """
        from rasterio.errors import RasterioIOError
        from rasterio.windows import Window

        if self._ds is None:
            self._ds = _open(self.info.path)
        w = Window(window.col_off, window.row_off, window.width, window.height)
        bands = list(self.info.bidx)
        try:
            data = self._ds.read(bands, window=w)  # (3, H, W)
            valid = self._ds.read_masks(bands, window=w).min(axis=0) > 0
        except RasterioIOError as exc:
            raise UserError(
                f"cannot read {self.info.path} at {window} (truncated or corrupt?): {gdal_message(exc)}"
            ) from exc
        if data.dtype.kind == "f":
            valid &= np.isfinite(data).all(axis=0)
        stretch = self.info.stretch
        rgb = stretch.apply(data) if stretch is not None else data.astype(np.uint8)
        rgb = np.where(valid[None], rgb, 0).transpose(1, 2, 0)  # (H, W, 3)
        return TileData(rgb=np.ascontiguousarray(rgb), valid=valid)

    def close(self) -> None:
        """Close the dataset handle."""
        if self._ds is not None:
            self._ds.close()
            self._ds = None
