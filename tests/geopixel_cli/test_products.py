"""Staged outputs: the vector layers, the id raster and the preview appear together or not at all."""

import pyogrio
import pytest
import rasterio
from cli_scenes import Rect, make_scene
from shapely.geometry import box

from geopixel_cli import products
from geopixel_cli.layers import Georef, Staging, objects_frame, runs_frame, select_objects, tiles_frame
from geopixel_cli.merge import MergedObject
from geopixel_cli.products import write_mask_raster, write_preview
from geopixel_cli.raster import open_scene


def _outputs(tmp_path):
    scene = make_scene(tmp_path / "s.tif", width=120, height=90, rects=(Rect(10, 10, 40, 30),))
    info = open_scene(str(scene), bidx=None)
    georef = Georef(info.crs_wkt, info.transform)
    objects = [MergedObject(box(10, 10, 40, 30), "red roofs", "red roof", 0, 0, (0,), 0.9)]
    kept = select_objects(objects, georef, simplify=0.0, min_area=0.0)
    record = {"tile_id": 0, "row": 0, "col": 0, "x_off": 0, "y_off": 0, "width": 120, "height": 90}
    record |= {"status": "done", "caption": "c", "n_phrases": 1, "n_objects": 1}
    frames = {
        "objects": objects_frame(kept, info.crs_wkt),
        "tiles": tiles_frame([record], georef),
        "runs": runs_frame({"command": "describe", "options": {"tile_size": 800}}),
    }
    return info, kept, frames


def _visible(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("ext", [".gpkg", ".shp"])
def test_staged_outputs_commit_together_main_last(tmp_path, ext):
    from geopixel_cli.layers import write_layers

    info, kept, frames = _outputs(tmp_path)
    out_dir, side_dir = tmp_path / "out", tmp_path / "side"
    out_dir.mkdir(), side_dir.mkdir()
    out, ids, png = out_dir / f"o{ext}", side_dir / "ids.tif", side_dir / "quick.png"
    with Staging(out) as staging:
        write_layers(out, frames, staging=staging)
        write_mask_raster(ids, info, kept, staging=staging)
        write_preview(png, info, kept, staging=staging)
        assert not out.exists() and not ids.exists() and not png.exists()  # only staged so far
        files = staging.commit()
    assert files[-1] == out and {ids, png} <= set(files) and all(f.exists() for f in files)
    assert len(pyogrio.read_dataframe(out, layer="objects" if ext == ".gpkg" else None)) == 1
    with rasterio.open(ids) as ds:
        assert ds.read(1)[10:30, 10:40].min() == 1 and ds.read(1).sum() == 600
    assert not [p for p in tmp_path.rglob(".*")]  # no hidden staging folder or temporary file left
    if ext == ".shp":
        assert {"o.shx", "o.dbf", "o.prj", "o_tiles.shp", "o.shp.runs.json"} <= set(_visible(out_dir))


def test_failed_side_product_leaves_no_output(tmp_path, monkeypatch):
    from geopixel_cli.layers import write_layers

    info, kept, frames = _outputs(tmp_path)
    out, ids, png = tmp_path / "o.gpkg", tmp_path / "ids.tif", tmp_path / "quick.png"
    before = _visible(tmp_path)

    def broken(*args, **kwargs):
        raise OSError("cannot read the scene")

    monkeypatch.setattr(products, "_quicklook", broken)
    with pytest.raises(OSError, match="cannot read"), Staging(out) as staging:
        write_mask_raster(ids, info, kept, staging=staging)
        write_layers(out, frames, staging=staging)
        write_preview(png, info, kept, staging=staging)
        staging.commit()
    assert _visible(tmp_path) == before


def test_unstaged_writers_still_write_in_place(tmp_path):
    info, kept, _ = _outputs(tmp_path)
    write_mask_raster(tmp_path / "ids.tif", info, kept)
    write_preview(tmp_path / "quick.png", info, kept, side=64)
    assert _visible(tmp_path) == ["ids.tif", "quick.png", "s.tif"]
    with rasterio.open(tmp_path / "ids.tif") as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
