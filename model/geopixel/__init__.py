"""GeoPixel: pixel-grounded descriptions and referring segmentation of remote-sensing images.

Public API::

    from geopixel import GeoPixel
    model = GeoPixel.from_pretrained("MBZUAI/GeoPixel-7B", device="cuda", dtype="bf16")
    result = model.describe("tile.png")

Importing this package is cheap and side-effect free: the network modules (torch, transformers)
are imported on first use of a name below, and nothing touches the network until a hub id is
passed to :meth:`GeoPixel.from_pretrained`. No GIS library is ever imported here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from geopixel.checkpoint import load_checkpoint
    from geopixel.config import GeoPixelConfig
    from geopixel.generate import generate
    from geopixel.modeling import GeoPixel
    from geopixel.result import GeoPixelResult, Phrase

__all__ = ["GeoPixel", "GeoPixelConfig", "GeoPixelResult", "Phrase", "generate", "load_checkpoint"]

_SOURCES = {
    "GeoPixel": "geopixel.modeling",
    "GeoPixelConfig": "geopixel.config",
    "GeoPixelResult": "geopixel.result",
    "Phrase": "geopixel.result",
    "generate": "geopixel.generate",
    "load_checkpoint": "geopixel.checkpoint",
}


def __getattr__(name: str) -> Any:
    """Import a public name on first access (PEP 562)."""
    if name not in _SOURCES:
        raise AttributeError(f"module 'geopixel' has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
