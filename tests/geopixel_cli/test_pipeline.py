import json
import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
from affine import Affine
from cli_scenes import Rect, ScriptedModel, make_scene
from pyproj import CRS
from shapely.geometry import box

from geopixel_cli.errors import UserError
from geopixel_cli.journal import journal_path
from geopixel_cli.pipeline import run
from geopixel_cli.runconfig import RunConfig

# 517 x 433 px with tile 200 / overlap 40: seams near x 160-200, 317-360 and y 160-200, 233-296.
RECTS = (
    Rect(150, 50, 230, 90),  # cut by tile 0's right edge
    Rect(170, 165, 215, 215),  # four-tile corner
    Rect(300, 300, 480, 330),  # into the snapped last column
    Rect(20, 260, 60, 290, "blue"),
    Rect(380, 20, 420, 60, "blue"),
)
UTM = Affine(0.5, 0, 500000.0, 0, -0.5, 5000000.0)
UTM_K0 = 0.9996  # UTM scale factor on the central meridian


def _config(scene, out, **kw):
    base = dict(
        command="describe",
        scene=str(scene),
        output=Path(out),
        model="scripted",
        tile_size=200,
        overlap=40,
        batch_size=2,
        progress=False,
    )
    base.update(kw)
    return RunConfig(**base)


def _crs_box(rect, t):
    x0, y0 = t @ (rect.x0, rect.y0)
    x1, y1 = t @ (rect.x1, rect.y1)
    return box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def _check_objects(objects, rects, transform):
    assert len(objects) == len(rects)
    for rect in rects:
        target = _crs_box(rect, transform)
        hits = objects[objects.geometry.intersection(target).area > 0.01 * target.area]
        assert len(hits) == 1, rect
        geom = hits.geometry.iloc[0]
        assert geom.symmetric_difference(target).area <= 1e-6 * target.area
        assert hits["phrase"].iloc[0] == ("red roofs" if rect.colour == "red" else "a storage tank")


@pytest.mark.parametrize(
    "crs,dtype,bands,nodata,border",
    [
        ("EPSG:32633", "uint8", 3, None, 0),
        ("EPSG:32733", "uint16", 3, 0, 12),
        ("EPSG:32633", "uint8", 4, 0, 12),
    ],
)
def test_describe_projected_scene_to_gpkg(tmp_path, crs, dtype, bands, nodata, border):
    scene = make_scene(
        tmp_path / "scene.tif", crs=crs, dtype=dtype, bands=bands, nodata=nodata, border=border, rects=RECTS
    )
    model = ScriptedModel()
    summary = run(_config(scene, tmp_path / "out.gpkg"), model=model)
    out = tmp_path / "out.gpkg"
    assert summary.files[-1] == out and out.exists()
    assert not journal_path(out).exists()
    assert sorted(pyogrio.list_layers(out)[:, 0].tolist()) == ["objects", "runs", "tiles"]
    objects = pyogrio.read_dataframe(out, layer="objects")
    assert CRS.from_user_input(objects.crs) == CRS.from_user_input(crs)
    _check_objects(objects, RECTS, UTM)
    # Geodesic measures: on the central meridian of a UTM zone (easting 500 km) a ground
    # length is the grid length / k0, k0 = 0.9996.
    areas = sorted(objects["area_m2"])
    assert areas == pytest.approx(sorted(r.area_px * 0.25 / UTM_K0**2 for r in RECTS), rel=1e-5)
    perim = objects.loc[objects["phrase"] == "red roofs", "perimeter_m"]
    assert sorted(perim) == pytest.approx(
        sorted(2 * 0.5 * ((r.x1 - r.x0) + (r.y1 - r.y0)) / UTM_K0 for r in RECTS if r.colour == "red"),
        rel=1e-5,
    )
    assert set(objects["category"]) == {"red roof", "storage tank"}
    assert (objects["score"] > 0).all() and objects["object_id"].tolist() == list(range(1, len(RECTS) + 1))
    tiles = pyogrio.read_dataframe(out, layer="tiles")
    assert len(tiles) == 9 and set(tiles["status"]) == {"done"}
    assert tiles["n_objects"].sum() == len(RECTS)
    assert not tiles["caption"].str.contains(r"<p>|\[SEG\]").any()
    assert tiles.loc[0, "caption"].startswith("The image shows")
    assert all(n <= 2 for n in model.calls) and sum(model.calls) == 9
    runs = pyogrio.read_dataframe(out, layer="runs")
    assert runs.loc[0, "command"] == "describe" and '"tile_size": 200' in runs.loc[0, "options"]


def test_geographic_scene_areas_in_square_metres(tmp_path):
    res = 5e-6  # degrees, ~0.55 m x 0.39 m at 45 N
    t = Affine(res, 0, 10.0, 0, -res, 45.0)
    scene = make_scene(tmp_path / "geo.tif", crs="EPSG:4326", transform=t, rects=RECTS)
    run(_config(scene, tmp_path / "geo.gpkg"), model=ScriptedModel())
    objects = pyogrio.read_dataframe(tmp_path / "geo.gpkg", layer="objects")
    _check_objects(objects, RECTS, t)
    lat = math.radians(45.0)
    m_per_deg_x = 111412.84 * math.cos(lat) - 93.5 * math.cos(3 * lat)
    m_per_deg_y = 111132.92 - 559.82 * math.cos(2 * lat) + 1.175 * math.cos(4 * lat)
    expected = sorted(r.area_px * res * res * m_per_deg_x * m_per_deg_y for r in RECTS)
    assert sorted(objects["area_m2"]) == pytest.approx(expected, rel=2e-3)


def test_band_selection_swaps_colours(tmp_path):
    scene = make_scene(tmp_path / "s.tif", bands=3, rects=RECTS)
    run(_config(scene, tmp_path / "bgr.gpkg", bidx=(3, 2, 1)), model=ScriptedModel())
    objects = pyogrio.read_dataframe(tmp_path / "bgr.gpkg", layer="objects")
    swapped = tuple(Rect(r.x0, r.y0, r.x1, r.y1, "blue" if r.colour == "red" else "red") for r in RECTS)
    _check_objects(objects, swapped, UTM)


def test_single_band_scene_is_grey(tmp_path):
    scene = make_scene(tmp_path / "s.tif", bands=1, rects=RECTS)
    run(_config(scene, tmp_path / "o.gpkg"), model=ScriptedModel())
    assert len(pyogrio.read_dataframe(tmp_path / "o.gpkg", layer="objects")) == 0
    assert pyogrio.read_info(tmp_path / "o.gpkg", layer="objects")["crs"] == "EPSG:32633"


def test_mostly_nodata_tiles_skipped_and_predictions_erased(tmp_path):
    scene = make_scene(tmp_path / "s.tif", nodata=0, border=12, rects=RECTS)
    with rasterio.open(scene, "r+") as ds:  # right part nodata: the last tile column is ~95 % nodata
        data = ds.read()
        data[:, :, 327:] = 0
        ds.write(data)
    model = ScriptedModel()
    run(
        _config(scene, tmp_path / "seg.gpkg", command="segment", expression="red roofs", model="x"),
        model=model,
    )
    tiles = pyogrio.read_dataframe(tmp_path / "seg.gpkg", layer="tiles")
    assert (tiles.loc[tiles["col"] == 2, "status"] == "skipped_nodata").all()
    assert (tiles.loc[tiles["col"] < 2, "status"] == "done").all()
    assert sum(model.calls) == 6
    objects = pyogrio.read_dataframe(tmp_path / "seg.gpkg", layer="objects")
    # the scripted false positive sits in each tile's top-left 3x3 pixels: on nodata for tiles in row/col 0
    fps = objects[objects["score"] < 0.5]
    assert len(fps) == 2  # only tiles (row 1, col 1) and (row 2, col 1) have their corner on valid data
    valid_box = _crs_box(Rect(12, 12, 327, 421), UTM)
    assert objects.geometry.within(valid_box.buffer(1e-6)).all()


def test_segment_scores_top_k_and_order(tmp_path):
    scene = make_scene(tmp_path / "s.tif", rects=RECTS)
    out = tmp_path / "seg.gpkg"
    run(_config(scene, out, command="segment", expression="red roofs"), model=ScriptedModel())
    objects = pyogrio.read_dataframe(out, layer="objects")
    assert len(objects) == 3 + 9  # three red objects, one weak false positive per tile
    assert list(objects["score"]) == sorted(objects["score"], reverse=True)
    run(
        _config(scene, out, command="segment", expression="red roofs", top_k=3, overwrite=True),
        model=ScriptedModel(),
    )
    top = pyogrio.read_dataframe(out, layer="objects")
    _check_objects(top, tuple(r for r in RECTS if r.colour == "red"), UTM)
    assert (top["phrase"] == "red roofs").all() and top["score"].tolist() == pytest.approx([0.9] * 3)


@pytest.mark.parametrize("ext", [".geojson", ".fgb", ".parquet", ".shp"])
def test_formats(tmp_path, ext):
    scene = make_scene(tmp_path / "s.tif", rects=RECTS)
    out = tmp_path / f"out{ext}"
    summary = run(_config(scene, out), model=ScriptedModel())
    assert summary.files[-1] == out
    assert (tmp_path / f"out_tiles{ext}").exists()
    runs = json.loads((tmp_path / f"out{ext}.runs.json").read_text())
    assert runs["options"]["tile_size"] == 200 and runs["n_objects"] == len(RECTS)
    if ext == ".parquet":
        import geopandas as gpd

        objects = gpd.read_parquet(out)
    else:
        objects = pyogrio.read_dataframe(out)
    if ext == ".geojson":
        assert CRS.from_user_input(objects.crs).to_epsg() == 4326
        objects = objects.to_crs(32633)
        tol = 1e-3
    else:
        assert CRS.from_user_input(objects.crs).to_epsg() == 32633
        tol = 1e-6
    assert len(objects) == len(RECTS)
    for rect in RECTS:
        target = _crs_box(rect, UTM)
        assert min(g.symmetric_difference(target).area for g in objects.geometry) <= tol * target.area + tol
    if ext == ".shp":
        assert "perim_m" in objects.columns and all(len(c) <= 10 for c in objects.columns)


def test_existing_output_refused_and_nothing_written(tmp_path):
    scene = make_scene(tmp_path / "s.tif", rects=RECTS)
    out = tmp_path / "out.gpkg"
    out.write_text("keep me")
    with pytest.raises(UserError, match="already exists"):
        run(_config(scene, out), model=ScriptedModel())
    assert out.read_text() == "keep me"
    run(_config(scene, out, overwrite=True), model=ScriptedModel())
    assert len(pyogrio.read_dataframe(out, layer="objects")) == len(RECTS)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_resume_gives_the_same_layers(tmp_path):
    scene = make_scene(tmp_path / "s.tif", rects=RECTS)
    full = tmp_path / "full.gpkg"
    run(_config(scene, full, batch_size=1), model=ScriptedModel())
    out = tmp_path / "resumed.gpkg"
    with pytest.raises(UserError, match="--resume"):
        run(_config(scene, out, batch_size=1), model=ScriptedModel(fail_after=4))
    assert not out.exists() and journal_path(out).exists()
    second = ScriptedModel()
    summary = run(_config(scene, out, batch_size=1, resume=True), model=second)
    assert summary.n_resumed == 4 and sum(second.calls) == 5
    assert not journal_path(out).exists()
    for layer in ("objects", "tiles"):
        a = pyogrio.read_dataframe(full, layer=layer)
        b = pyogrio.read_dataframe(out, layer=layer)
        assert a.drop(columns="geometry").equals(b.drop(columns="geometry"))
        assert all(x.equals_exact(y, 0) for x, y in zip(a.geometry, b.geometry, strict=True))


def test_resume_refuses_changed_options(tmp_path):
    scene = make_scene(tmp_path / "s.tif", rects=RECTS)
    out = tmp_path / "o.gpkg"
    with pytest.raises(UserError):
        run(_config(scene, out), model=ScriptedModel(fail_after=1))
    with pytest.raises(UserError, match="different options.*overlap"):
        run(_config(scene, out, overlap=60, resume=True), model=ScriptedModel())


def test_mask_raster_and_preview(tmp_path):
    scene = make_scene(tmp_path / "s.tif", rects=RECTS)
    out, ids, png = tmp_path / "o.gpkg", tmp_path / "ids.tif", tmp_path / "quick.png"
    summary = run(_config(scene, out, mask_raster=ids, preview=png), model=ScriptedModel())
    assert summary.files[-1] == out and {ids, png} <= set(summary.files)  # the main output last
    objects = pyogrio.read_dataframe(out, layer="objects")
    with rasterio.open(ids) as ds, rasterio.open(scene) as src:
        assert ds.dtypes[0] == "uint32" and ds.transform == src.transform and ds.crs == src.crs
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        arr = ds.read(1)
    for rect in RECTS:
        values = np.unique(arr[rect.y0 : rect.y1, rect.x0 : rect.x1])
        assert len(values) == 1 and values[0] > 0
        hit = objects[objects["object_id"] == values[0]]
        assert hit.geometry.iloc[0].contains(_crs_box(rect, UTM).centroid)
    assert (arr > 0).sum() == sum(r.area_px for r in RECTS)
    from PIL import Image

    assert Image.open(png).size == (517, 433)


def test_no_crs_scene_uses_pixel_coordinates(tmp_path, caplog):
    scene = make_scene(tmp_path / "s.tif", crs=None, transform=Affine.identity(), rects=RECTS)
    with caplog.at_level(logging.WARNING, logger="geopixel_cli"):
        run(_config(scene, tmp_path / "o.gpkg"), model=ScriptedModel())
    assert "no CRS" in caplog.text
    objects = pyogrio.read_dataframe(tmp_path / "o.gpkg", layer="objects")
    assert objects.crs is None
    _check_objects(objects, RECTS, Affine.identity())
    assert objects["area_m2"].isna().all()


def test_png_with_world_file_and_no_crs(tmp_path, caplog):
    from PIL import Image

    tif = make_scene(tmp_path / "s.tif", rects=RECTS)
    with rasterio.open(tif) as ds:
        Image.fromarray(ds.read().transpose(1, 2, 0)).save(tmp_path / "photo.png")
    # world file: pixel size 2, rotation 0, 0, -2, centre of the top-left pixel at (1001, 1999)
    (tmp_path / "photo.pgw").write_text("2\n0\n0\n-2\n1001\n1999\n")
    with caplog.at_level(logging.WARNING, logger="geopixel_cli"):
        run(_config(tmp_path / "photo.png", tmp_path / "o.gpkg"), model=ScriptedModel())
    assert "no CRS" in caplog.text
    objects = pyogrio.read_dataframe(tmp_path / "o.gpkg", layer="objects")
    _check_objects(objects, RECTS, Affine(2, 0, 1000, 0, -2, 2000))


def test_failed_write_leaves_nothing_and_keeps_journal(tmp_path, monkeypatch):
    from geopixel_cli import layers

    scene = make_scene(tmp_path / "s.tif", rects=RECTS)
    out = tmp_path / "o.gpkg"
    real = layers._write_frame

    def flaky(frame, path, layer):
        real(frame, path, layer)
        if layer == "objects":
            raise OSError("disk full")

    monkeypatch.setattr(layers, "_write_frame", flaky)
    with pytest.raises(OSError, match="disk full"):
        run(_config(scene, out), model=ScriptedModel())
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.gpkg.geopixel-journal", "s.tif"]
    monkeypatch.setattr(layers, "_write_frame", real)
    model = ScriptedModel()
    run(_config(scene, out, resume=True), model=model)  # only the write is redone
    assert model.calls == [] and len(pyogrio.read_dataframe(out, layer="objects")) == len(RECTS)


def test_batch_size_chosen_from_free_gpu_memory(tmp_path, monkeypatch, caplog):
    import torch
    from geopixel import GeoPixelConfig
    from geopixel.memory import auto_batch_size, tile_prompt_tokens

    from geopixel_cli.pipeline import resolve_batch_size

    scene = make_scene(tmp_path / "scene.tif", width=517, height=433, rects=RECTS)
    model = ScriptedModel()  # a CUDA-looking double: the real 7B sizes, no GPU touched
    model.device, model.dtype = torch.device("cuda", 0), torch.bfloat16
    model.config = GeoPixelConfig.from_name("geopixel-7b")
    free, held_unused = 12e9, 2e9  # 14 GB: a few tiles (200 px tiles still get the 3x3 grid), not all 9
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free), int(80e9)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int(held_unused + 1e9))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: int(1e9))
    tokens, crops = tile_prompt_tokens(model.config, width=200, height=200, hd_num=9)
    expected = auto_batch_size(
        free_bytes=int(free + held_unused),
        config=model.config,
        prompt_tokens=tokens,
        max_new_tokens=1024,
        dtype=torch.bfloat16,
        crops_per_image=crops,
    )
    assert 1 < expected < 9
    config = _config(scene, tmp_path / "out.gpkg", batch_size=None)
    assert resolve_batch_size(model, config) == expected
    assert resolve_batch_size(model, _config(scene, tmp_path / "x.gpkg", batch_size=3)) == 3  # explicit
    assert resolve_batch_size(ScriptedModel(), config) == 1  # no CUDA device: 1
    with caplog.at_level(logging.INFO, logger="geopixel_cli"):
        run(config, model=model)
    assert model.calls[0] == expected and sum(model.calls) == 9
    assert f"batch size {expected}, chosen from 14.0 GB" in caplog.text


@dataclass
class _LogitModel(ScriptedModel):
    """Scripted double that can also return mask logits (as ``GeoPixel`` does when asked)."""

    asked: list = field(default_factory=list)

    def segment_batch(self, images, expression, *, hd_num=9, max_new_tokens=64, keep_mask_logits=False):
        self.asked.append(keep_mask_logits)
        results = super().segment_batch(images, expression, hd_num=hd_num, max_new_tokens=max_new_tokens)
        if keep_mask_logits:
            for r in results:
                r.mask_logits = np.where(r.masks, 2.0, -2.0).astype(np.float16)  # sigmoid(2) inside
        return results


def test_pipeline_asks_for_mask_logits_and_scores_regions_with_them(tmp_path):
    scene = make_scene(tmp_path / "s.tif", rects=RECTS)
    out = tmp_path / "seg.gpkg"
    model = _LogitModel()
    run(_config(scene, out, command="segment", expression="red roofs", top_k=3), model=model)
    assert model.asked and all(model.asked)
    top = pyogrio.read_dataframe(out, layer="objects")
    _check_objects(top, tuple(r for r in RECTS if r.colour == "red"), UTM)
    prob = 1 / (1 + math.exp(-2.0))
    assert top["score"].tolist() == pytest.approx([0.9 * prob] * 3, rel=1e-3)


@dataclass
class _PreparingModel(ScriptedModel):
    """Scripted double with GeoPixel's split: ``prepare`` (CPU) and ``run_prepared`` (device)."""

    prepared_on: list = field(default_factory=list)
    run_on: list = field(default_factory=list)

    def describe_query(self, prompt=None):
        return prompt or "describe"

    def segment_query(self, expression):
        return f"segment {expression}"

    def prepare(self, images, queries, *, hd_num, max_new_tokens):
        self.prepared_on.append(threading.current_thread().name)
        return {"images": images, "query": queries, "hd_num": hd_num}

    def run_prepared(self, prepared, *, keep_mask_logits=False):
        self.run_on.append(threading.current_thread().name)
        assert keep_mask_logits and all(p["hd_num"] == 9 for p in prepared)
        images = [im for p in prepared for im in p["images"]]
        if prepared[0]["query"] == "describe":
            return self.describe_batch(images)
        return self.segment_batch(images, prepared[0]["query"].removeprefix("segment "))


def test_tiles_are_prepared_on_reader_threads_when_the_model_can(tmp_path):
    scene = make_scene(tmp_path / "scene.tif", border=12, nodata=0, rects=RECTS)
    model = _PreparingModel()
    run(_config(scene, tmp_path / "out.gpkg", readers=2, batch_size=3), model=model)
    assert len(model.prepared_on) == sum(model.calls) == 9  # every tile goes through prepare once
    assert all(name.startswith("geopixel-read") for name in model.prepared_on)
    assert model.run_on == [threading.main_thread().name] * len(model.calls) and model.calls == [3, 3, 3]
    _check_objects(pyogrio.read_dataframe(tmp_path / "out.gpkg", layer="objects"), RECTS, UTM)
    seg = _PreparingModel()
    run(_config(scene, tmp_path / "seg.gpkg", command="segment", expression=" red roofs "), model=seg)
    assert len(seg.prepared_on) == 9


def test_failed_side_product_leaves_no_output(tmp_path, monkeypatch):
    from geopixel_cli import products

    scene = make_scene(tmp_path / "s.tif", rects=RECTS)
    out, ids, png = tmp_path / "o.gpkg", tmp_path / "ids.tif", tmp_path / "quick.png"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(products, "write_preview", broken)
    with pytest.raises(OSError, match="disk full"):
        run(_config(scene, out, mask_raster=ids, preview=png), model=ScriptedModel())
    assert not out.exists() and not ids.exists() and not png.exists()  # the layers were only staged
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.gpkg.geopixel-journal", "s.tif"]
    monkeypatch.undo()
    model = ScriptedModel()
    summary = run(_config(scene, out, mask_raster=ids, preview=png, resume=True), model=model)
    assert model.calls == [] and summary.files[-1] == out and ids.exists() and png.exists()
