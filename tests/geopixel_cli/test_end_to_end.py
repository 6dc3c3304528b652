"""The real tiny network through the CLI, with a forced answer so that objects are really written.

The golden tiny checkpoint has random weights: left to itself it never emits ``[SEG]``, so a plain
run writes empty layers. Here its generation is teacher-forced (``run_prepared`` gets
``forced_token_ids``) with an answer that grounds one phrase; everything else (reading, preparing
on the reader threads, CLIP, the LLM, SAM-2, vectorizing with the mask logits, seam merge,
writing) is the real code path.
"""

from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import torch
from cli_scenes import Rect, make_scene
from geopixel import GeoPixel
from geopixel.host import PreparedBatch
from geopixel.tokenizer import GeoPixelTokenizer
from shapely.ops import unary_union
from typer.testing import CliRunner

from geopixel_cli.cli import app

TINY = Path(__file__).resolve().parents[2].parent / "shared" / "golden" / "reference-tiny"

ANSWERS = {
    "describe": "The image shows <p> red roofs </p> [SEG] .",
    "segment": "Sure, it is [SEG].",
}


@pytest.fixture
def forced_answers(monkeypatch):
    """Teacher-force every ``run_prepared`` call; returns the list of its ``keep_mask_logits``."""
    real = GeoPixel.run_prepared
    asked: list[bool] = []

    def forced(self, prepared, *, answer, **kw):
        batch = prepared if isinstance(prepared, PreparedBatch) else PreparedBatch.join(prepared)
        ids = self.tokenizer.answer_ids(answer)
        assert batch.max_new_tokens == len(ids)  # --max-new-tokens is the forced answer's length
        asked.append(kw.get("keep_mask_logits", False))
        return real(self, batch, forced_token_ids=torch.tensor([ids] * len(batch)), **kw)

    def install(answer):
        def run_prepared(self, prepared, **kw):
            return forced(self, prepared, answer=answer, **kw)

        monkeypatch.setattr(GeoPixel, "run_prepared", run_prepared)
        return asked

    return install


@pytest.mark.parametrize(
    "command,width",
    [
        ("segment", 300),  # one 300 px tile
        ("describe", 300),
        ("segment", 480),  # two tiles: the object crosses the seam
    ],
)
def test_tiny_network_writes_real_objects(tmp_path, monkeypatch, forced_answers, command, width):
    assert (TINY / "model.safetensors").exists(), f"golden checkpoint missing: {TINY} (needs ../shared)"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    answer = ANSWERS[command]
    asked = forced_answers(answer)
    n_tokens = len(GeoPixelTokenizer.from_dir(TINY).answer_ids(answer))
    scene = make_scene(tmp_path / "scene.tif", width=width, height=300, rects=(Rect(150, 100, 230, 160),))
    out, ids_path = tmp_path / "out.gpkg", tmp_path / "ids.tif"
    args = [command, scene, *(["red roofs"] if command == "segment" else [])]
    args += ["-o", out, "--model", TINY, "--device", "cpu", "--dtype", "fp32", "--tile-size", 300]
    args += ["--overlap", 60, "--hd-num", 1, "--max-new-tokens", n_tokens, "--batch-size", 2]
    args += ["--mask-raster", ids_path, "-q"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert asked and all(asked)  # the pipeline went through run_prepared and asked for the logits

    objects = pyogrio.read_dataframe(out, layer="objects")
    tiles = pyogrio.read_dataframe(out, layer="tiles")
    assert len(tiles) == (1 if width == 300 else 2) and set(tiles["status"]) == {"done"}
    assert len(objects) > 0 and (objects["phrase"] == "red roofs").all()
    assert (objects["area_m2"] > 0).all()  # square metres: UTM scene, 0.5 m pixels
    assert ((objects["score"] > 0) & (objects["score"] <= 1)).all()
    footprints = dict(zip(tiles["tile_id"], tiles.geometry, strict=True))
    for geom, tile_ids in zip(objects.geometry, objects["tile_ids"], strict=True):
        seen_by = unary_union([footprints[int(t)] for t in str(tile_ids).split(",")])
        assert geom.is_valid and geom.within(seen_by.buffer(1e-6))
    assert objects.geometry.area.sum() <= unary_union(tiles.geometry).area + 1e-6

    with rasterio.open(ids_path) as ds:
        ids = ds.read(1)
    assert ids.shape == (300, width) and (ids > 0).any()
    assert set(np.unique(ids)) <= {0, *objects["object_id"]}
