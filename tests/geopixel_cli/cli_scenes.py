"""Synthetic scenes and a scripted model double for the geopixel_cli tests (no network, seeded).

The scripted model "sees" coloured rectangles the way a perfect segmenter would: red pixels
(R far above G and B) are the phrase "red roofs", blue pixels the phrase "a storage tank".
So a test knows exactly which objects every tile must report, and where.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from geopixel.result import GeoPixelResult, Phrase

RED = (220, 20, 20)
BLUE = (20, 20, 220)


@dataclass(frozen=True)
class Rect:
    """A coloured rectangle in scene pixels: columns x0..x1, rows y0..y1 (half-open)."""

    x0: int
    y0: int
    x1: int
    y1: int
    colour: str = "red"

    @property
    def area_px(self) -> int:
        return (self.x1 - self.x0) * (self.y1 - self.y0)


def make_scene(
    path: Path,
    *,
    width: int = 517,
    height: int = 433,
    crs: str | None = "EPSG:32633",
    transform: Affine | None = None,
    dtype: str = "uint8",
    bands: int = 3,
    nodata: float | None = None,
    border: int = 0,
    rects: tuple[Rect, ...] = (),
    seed: int = 0,
) -> Path:
    """Write a GeoTIFF: grey noise background, coloured rectangles, optional nodata border."""
    rng = np.random.default_rng(seed)
    grey = rng.integers(80, 160, (height, width)).astype(np.float64)
    rgb = np.stack([grey, grey, grey])  # (3, H, W)
    for r in rects:
        colour = RED if r.colour == "red" else BLUE
        for c in range(3):
            rgb[c, r.y0 : r.y1, r.x0 : r.x1] = colour[c]
    if dtype == "uint16":
        data = rgb * 40.0 + 300.0  # ~3,500-9,100 DN: needs the scene stretch to look like the uint8 scene
    elif dtype == "float32":
        data = rgb / 255.0
    else:
        data = rgb
    if bands == 1:
        data = data[:1]
    elif bands == 4:
        data = np.concatenate([data, data[:1] * 0 + data.mean()])
    out = data.astype(dtype)
    if border and nodata is not None:
        out[:, :border, :] = nodata
        out[:, :, :border] = nodata
        out[:, -border:, :] = nodata
    if transform is None:
        transform = Affine(0.5, 0, 500000.0, 0, -0.5, 5000000.0)
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": out.shape[0],
        "dtype": dtype,
        "transform": transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": 128,
        "blockysize": 128,
    }
    if crs is not None:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(out)
    return path


def _text_with_phrases(names: list[str]) -> tuple[str, list[Phrase]]:
    text, phrases = "The image shows", []
    for i, name in enumerate(names):
        text += " <p> "
        start = len(text)
        text += name
        phrases.append(Phrase(name, start, len(text), i))
        text += " </p> [SEG]" + (" and" if i + 1 < len(names) else ".")
    return text, phrases


@dataclass
class ScriptedModel:
    """Model double: finds red and blue pixels; records every call's batch size."""

    red_score: float = 0.9
    blue_score: float = 0.6
    calls: list[int] = field(default_factory=list)
    fail_after: int | None = None

    def _masks(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        img = image.astype(np.int16)
        red = img[..., 0] - np.maximum(img[..., 1], img[..., 2]) > 100
        blue = img[..., 2] - np.maximum(img[..., 0], img[..., 1]) > 100
        return red, blue

    def _tick(self, n: int) -> None:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt  # simulate Ctrl-C in the middle of a run
        self.calls.append(n)

    def describe_batch(self, images, *, prompt=None, hd_num=9, max_new_tokens=1024):
        self._tick(len(images))
        results = []
        for image in images:
            red, blue = self._masks(image)
            named = [
                (m, n, s)
                for m, n, s in ((red, "red roofs", self.red_score), (blue, "a storage tank", self.blue_score))
                if m.any()
            ]
            text, phrases = _text_with_phrases([n for _, n, _ in named])
            masks = np.stack([m for m, _, _ in named]) if named else np.zeros((0, *image.shape[:2]), bool)
            scores = np.asarray([s for _, _, s in named], np.float32)
            results.append(
                GeoPixelResult(text=text, phrases=phrases, masks=masks, scores=scores, token_ids=[])
            )
        return results

    def segment_batch(self, images, expression, *, hd_num=9, max_new_tokens=64):
        self._tick(len(images))
        results = []
        for image in images:
            red, _ = self._masks(image)
            # a weak false positive in every tile: the top-left 3x3 pixels
            fp = np.zeros(image.shape[:2], bool)
            fp[:3, :3] = True
            masks = np.stack([red, fp])
            scores = np.asarray([self.red_score, 0.05], np.float32)
            results.append(
                GeoPixelResult(text="Sure, [SEG].", phrases=[], masks=masks, scores=scores, token_ids=[])
            )
        return results
