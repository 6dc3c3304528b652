"""Output filters, from the command line to the written layer: --min-area, --simplify, --min-score, --top-k.

The CLI runs the real pipeline; only the model load is replaced by the scripted double, so the
options travel the whole way (Typer -> RunConfig -> select_objects -> the file).
"""

import math

import pyogrio
import pytest
from affine import Affine
from cli_scenes import Rect, ScriptedModel, make_scene
from typer.testing import CliRunner

from geopixel_cli import pipeline
from geopixel_cli.cli import app

# 0.5 m pixels (UTM); red 800, 562.5, 1,350 m² and blue 300, 400 m² on the map grid
RECTS = (
    Rect(150, 50, 230, 90),
    Rect(170, 165, 215, 215),
    Rect(300, 300, 480, 330),
    Rect(20, 260, 60, 290, "blue"),
    Rect(380, 20, 420, 60, "blue"),
)
# a staircase (8 steps of 4 px): one object with many vertices, nearly a right triangle
STAIRS = tuple(Rect(100, 340 + 4 * k, 100 + 4 * (k + 1), 340 + 4 * (k + 1)) for k in range(8))


@pytest.fixture(autouse=True)
def _scripted_model(monkeypatch):
    monkeypatch.setattr(pipeline, "load_model", lambda *args, **kwargs: ScriptedModel())


def _objects(tmp_path, scene, *args):
    out = tmp_path / "o.gpkg"
    result = CliRunner().invoke(
        app, [*args[:1], str(scene), *args[1:], "-o", str(out), "--device", "cpu", "-q", "--overwrite"]
    )
    assert result.exit_code == 0, result.output
    return pyogrio.read_dataframe(out, layer="objects")


def test_min_area_projected_in_square_metres(tmp_path):
    scene = make_scene(tmp_path / "s.tif", rects=RECTS)
    assert len(_objects(tmp_path, scene, "describe")) == 5
    kept = _objects(tmp_path, scene, "describe", "--min-area", "500")
    assert sorted(round(a) for a in kept["area_m2"]) == [563, 801, 1351]  # geodesic: map area / 0.9996²
    assert (kept["phrase"] == "red roofs").all()


def test_min_area_geographic_in_square_metres(tmp_path):
    res = 5e-6  # degrees: ~0.39 m x 0.56 m at 45 N, so the red boxes are ~701, ~493, ~1,183 m²
    t = Affine(res, 0, 10.0, 0, -res, 45.0)
    scene = make_scene(tmp_path / "geo.tif", crs="EPSG:4326", transform=t, rects=RECTS)
    kept = _objects(tmp_path, scene, "describe", "--min-area", "450")
    lat = math.radians(45.0)
    px_m2 = res * res * (111412.84 * math.cos(lat)) * (111132.92 - 559.82 * math.cos(2 * lat))
    expected = sorted(r.area_px * px_m2 for r in RECTS if r.area_px * px_m2 >= 450)
    assert len(expected) == 3 and sorted(kept["area_m2"]) == pytest.approx(expected, rel=2e-3)


def test_simplify_in_map_units(tmp_path):
    scene = make_scene(tmp_path / "s.tif", rects=STAIRS)
    raw = _objects(tmp_path, scene, "describe").geometry.iloc[0]
    simple = _objects(tmp_path, scene, "describe", "--simplify", "3").geometry.iloc[0]  # 3 m = 6 px
    assert len(raw.geoms[0].exterior.coords) >= 16
    assert len(simple.geoms[0].exterior.coords) <= 6
    assert simple.hausdorff_distance(raw) <= 3.0 + 1e-9


def test_min_score_drops_low_scores(tmp_path):
    scene = make_scene(tmp_path / "s.tif", rects=RECTS)
    # the scripted segmenter adds a weak false positive (score 0.05) to the three red boxes
    seg = _objects(tmp_path, scene, "segment", "red roofs", "--min-score", "0.5")
    assert len(seg) == 3 and (seg["score"] >= 0.5).all()
    assert len(_objects(tmp_path, scene, "segment", "red roofs")) == 4


def test_top_k_keeps_the_best(tmp_path):
    scene = make_scene(tmp_path / "s.tif", rects=RECTS)
    top = _objects(tmp_path, scene, "segment", "red roofs", "--top-k", "2")
    assert len(top) == 2 and top["score"].tolist() == pytest.approx([0.9, 0.9])
    assert top["object_id"].tolist() == [1, 2]
