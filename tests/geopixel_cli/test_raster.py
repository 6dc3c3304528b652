import numpy as np
import pytest
import rasterio
from affine import Affine
from cli_scenes import Rect, make_scene

from geopixel_cli.errors import UserError
from geopixel_cli.raster import SceneReader, default_bidx, open_scene, parse_bidx
from geopixel_cli.tiling import PixelWindow


def test_uint8_used_as_is_and_window_reads(tmp_path):
    scene = make_scene(tmp_path / "s.tif", rects=(Rect(10, 20, 30, 40),))
    info = open_scene(str(scene))
    assert (info.width, info.height, info.count, info.dtype, info.bidx) == (517, 433, 3, "uint8", (1, 2, 3))
    assert info.stretch is None and info.valid_fraction == 1.0
    tile = SceneReader(info).read(PixelWindow(5, 15, 40, 30))
    with rasterio.open(scene) as ds:
        expected = ds.read(window=((15, 45), (5, 45))).transpose(1, 2, 0)
    assert tile.rgb.shape == (30, 40, 3) and tile.rgb.dtype == np.uint8
    np.testing.assert_array_equal(tile.rgb, expected)


def test_uint16_scene_stretch_is_scene_level(tmp_path):
    scene = make_scene(
        tmp_path / "s.tif", dtype="uint16", nodata=0, border=10, rects=(Rect(100, 100, 140, 140),)
    )
    info = open_scene(str(scene))
    assert info.stretch is not None
    reader = SceneReader(info)
    a = reader.read(PixelWindow(0, 0, 200, 200))
    b = reader.read(PixelWindow(300, 200, 200, 200))  # no object here: same grey levels must map the same
    assert abs(float(a.rgb[a.valid].mean()) - float(b.rgb[b.valid].mean())) < 12
    assert a.rgb[a.valid].max() == 255
    assert not a.valid[:10].any() and a.valid[10:, 10:].all()
    assert (a.rgb[~a.valid] == 0).all()


def test_float32_nan_is_nodata(tmp_path):
    scene = make_scene(tmp_path / "f.tif", dtype="float32", nodata=float("nan"), border=5)
    info = open_scene(str(scene))
    tile = SceneReader(info).read(PixelWindow(0, 0, 50, 50))
    assert not tile.valid[:5].any() and tile.valid[5:, 5:].all()


def test_bidx():
    assert parse_bidx("3,2,1") == (3, 2, 1) and parse_bidx(None) is None and parse_bidx("2") == (2,)
    assert default_bidx(4, None) == (1, 2, 3) and default_bidx(1, None) == (1, 1, 1)
    assert default_bidx(3, (2,)) == (2, 2, 2)
    for bad in ("1,2", "a,b,c", "0,1,2"):
        with pytest.raises(UserError):
            parse_bidx(bad)
    with pytest.raises(UserError, match="band 4"):
        default_bidx(3, (4, 2, 1))


def _write(path, data, **kw):
    profile = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": data.dtype.name,
        "crs": "EPSG:32633",
        "transform": Affine(1, 0, 0, 0, -1, 0),
    }
    profile.update(kw)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return str(path)


def test_bad_scenes_give_one_clear_line(tmp_path):
    cases = {}
    cases["not found"] = str(tmp_path / "missing.tif")
    (tmp_path / "notes.txt").write_text("hello")
    cases["cannot open"] = str(tmp_path / "notes.txt")
    full = _write(tmp_path / "full.tif", np.full((3, 300, 300), 7, np.uint8))
    data = open(full, "rb").read()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    cases["truncated"] = str(tmp_path / "cut.tif")
    (tmp_path / "zero.vrt").write_text(
        '<VRTDataset rasterXSize="0" rasterYSize="0"><VRTRasterBand dataType="Byte" band="1"/></VRTDataset>'
    )
    cases["0 x 0|empty"] = str(tmp_path / "zero.vrt")
    cases["dtype float64"] = _write(tmp_path / "f64.tif", np.zeros((1, 10, 10), np.float64))
    cases["rotated or sheared"] = _write(
        tmp_path / "rot.tif", np.ones((3, 10, 10), np.uint8), transform=Affine(1, 0.2, 0, 0.1, -1, 0)
    )
    cases["every pixel is nodata"] = _write(tmp_path / "nd.tif", np.zeros((3, 10, 10), np.uint8), nodata=0)
    for expected, path in cases.items():
        with pytest.raises(UserError) as err:
            open_scene(path)
        message = str(err.value)
        assert "\n" not in message
        assert any(part in message for part in expected.split("|")), (expected, message)
