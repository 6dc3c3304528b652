"""GeoPixel: pixel-grounded descriptions and referring segmentation of remote-sensing images.

Public API::

    from geopixel import GeoPixel
    model = GeoPixel.from_pretrained("MBZUAI/GeoPixel-7B", device="cuda", dtype="bf16")
    result = model.describe("tile.png")

Importing this package is side-effect free: it imports torch but not transformers (the CLIP and
SAM-2 modules load on first use of ``GeoPixel``), nothing touches the network until a hub id is
passed to :meth:`GeoPixel.from_pretrained`, and no GIS library is ever imported here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# ``generate`` is bound eagerly: its submodule has the same name, and importing the submodule later
# would otherwise make ``geopixel.generate`` the module instead of the function.
from geopixel.checkpoint import load_checkpoint
from geopixel.config import GeoPixelConfig
from geopixel.generate import generate
from geopixel.result import GeoPixelResult, Phrase

if TYPE_CHECKING:
    from geopixel.modeling import GeoPixel

__all__ = ["GeoPixel", "GeoPixelConfig", "GeoPixelResult", "Phrase", "generate", "load_checkpoint"]

_SOURCES = {"GeoPixel": "geopixel.modeling"}


def __getattr__(name: str) -> Any:
    """Import a public name on first access (PEP 562)."""
    if name not in _SOURCES:
        raise AttributeError(f"module 'geopixel' has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
