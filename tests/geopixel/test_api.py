"""The public API: what `import geopixel` exposes, imports and (never) touches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import geopixel
import pytest

PUBLIC = ["GeoPixel", "GeoPixelConfig", "GeoPixelResult", "Phrase", "generate", "load_checkpoint"]

# Runs in a fresh interpreter with every socket connection refused: importing geopixel, resolving
# every public name and loading + running the golden checkpoint must neither need the network nor
# import a GIS / CLI library.
_PROBE = """
import json, socket, sys
def refuse(*args, **kwargs):
    raise OSError("network access attempted")
socket.socket.connect = refuse
socket.create_connection = refuse
heavy = ("rasterio", "geopandas", "typer", "pyogrio", "shapely", "geopixel_cli")
import geopixel
after_import = sorted(m for m in ("transformers", *heavy) if m in sys.modules)
names = {n: type(getattr(geopixel, n)).__name__ for n in geopixel.__all__}
model = geopixel.GeoPixel.from_pretrained(sys.argv[1], device="cpu")
result = model.describe(sys.argv[2], hd_num=1, max_new_tokens=3)
print(json.dumps({
    "after_import": after_import,
    "names": names,
    "gis_loaded": sorted(m for m in heavy if m in sys.modules),
    "result": type(result).__name__,
    "n_tokens": len(result.token_ids),
}))
"""


def test_public_names() -> None:
    assert sorted(geopixel.__all__) == sorted(PUBLIC)
    assert dir(geopixel) == sorted(PUBLIC)
    with pytest.raises(AttributeError, match="no attribute 'model'"):
        _ = geopixel.model  # type: ignore[attr-defined]


def test_public_names_resolve_to_the_implementations() -> None:
    from geopixel.checkpoint import load_checkpoint
    from geopixel.config import GeoPixelConfig
    from geopixel.generate import generate
    from geopixel.modeling import GeoPixel
    from geopixel.result import GeoPixelResult, Phrase

    assert geopixel.GeoPixel is GeoPixel and geopixel.GeoPixelConfig is GeoPixelConfig
    assert geopixel.GeoPixelResult is GeoPixelResult and geopixel.Phrase is Phrase
    assert geopixel.generate is generate and geopixel.load_checkpoint is load_checkpoint


def test_import_is_light_offline_and_gis_free(golden_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    image = golden_dir / "images" / "img_800x800.png"
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(golden_dir), str(image)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["after_import"] == []  # `import geopixel` alone does not import transformers
    assert report["names"] == {
        "GeoPixel": "type", "GeoPixelConfig": "type", "GeoPixelResult": "type", "Phrase": "type",
        "generate": "function", "load_checkpoint": "function",
    }
    assert report["gis_loaded"] == []
    assert report["result"] == "GeoPixelResult" and report["n_tokens"] == 3
