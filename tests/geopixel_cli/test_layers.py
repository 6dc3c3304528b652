import math

import pytest
from pyproj import CRS
from shapely.geometry import box

from geopixel_cli.layers import Georef, select_objects
from geopixel_cli.merge import MergedObject

WGS84_A = 6378137.0
WGS84_E2 = 0.0066943799901413165


def _radii(lat_deg):
    """Prime-vertical (N) and meridional (M) radii of curvature of WGS 84 at a latitude."""
    s2 = math.sin(math.radians(lat_deg)) ** 2
    n = WGS84_A / math.sqrt(1 - WGS84_E2 * s2)
    m = WGS84_A * (1 - WGS84_E2) / (1 - WGS84_E2 * s2) ** 1.5
    return n, m


def _obj(geom, score=0.5, category="thing"):
    return MergedObject(geom, category, category, 0, 0, (0,), score)


def _georef(crs, transform):
    return Georef(CRS.from_user_input(crs).to_wkt(), transform)


def test_utm_metrics_close_to_planar():
    # 100 x 100 px of 1 m on UTM 33N's central meridian: true size = map size / k0 (k0 = 0.9996)
    georef = _georef("EPSG:32633", (1.0, 0.0, 500000.0, 0.0, -1.0, 5000000.0))
    area, perimeter = georef.metrics(georef.to_crs(box(0, 0, 100, 100)))
    assert area == pytest.approx(10000 / 0.9996**2, rel=1e-4)
    assert perimeter == pytest.approx(400 / 0.9996, rel=1e-4)


def test_web_mercator_at_60n_is_geodesic_not_planar():
    # Web Mercator y of 60 N; a 100 m box in map units there is ~50 m on the ground each way
    lat = 60.0
    y60 = WGS84_A * math.log(math.tan(math.pi / 4 + math.radians(lat) / 2))
    georef = _georef("EPSG:3857", (1.0, 0.0, 1000000.0, 0.0, -1.0, y60 + 50.0))
    area, perimeter = georef.metrics(georef.to_crs(box(0, 0, 100, 100)))
    n, m = _radii(lat)
    cos = math.cos(math.radians(lat))
    east, north = 100 * n * cos / WGS84_A, 100 * m * cos / WGS84_A  # ground metres per 100 map units
    assert area == pytest.approx(east * north, rel=1e-3)
    assert area == pytest.approx(2508, abs=2)
    assert perimeter == pytest.approx(2 * (east + north), rel=1e-3)


def test_geographic_metrics():
    res = 1e-4  # degrees
    georef = _georef("EPSG:4326", (res, 0.0, 10.0, 0.0, -res, 45.0 + 50 * res))
    area, _ = georef.metrics(georef.to_crs(box(0, 0, 100, 100)))
    n, m = _radii(45.0)
    side = math.radians(100 * res)
    assert area == pytest.approx((side * n * math.cos(math.radians(45.0))) * (side * m), rel=1e-3)


def test_no_crs_metrics_are_nan():
    area, perimeter = Georef(None, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)).metrics(box(0, 0, 3, 3))
    assert math.isnan(area) and math.isnan(perimeter)


def test_transformer_built_once_per_georef(monkeypatch):
    import pyproj

    calls = []
    real = pyproj.Transformer.from_crs

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(pyproj.Transformer, "from_crs", counting)
    georef = _georef("EPSG:3857", (1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    objs = [_obj(box(i * 10, 0, i * 10 + 5, 5)) for i in range(5)]
    kept = select_objects(objs, georef, simplify=0.0, min_area=0.0)
    assert len(kept) == 5 and len(calls) == 1


def test_min_area_filters_on_geodesic_area():
    lat = 60.0
    y60 = WGS84_A * math.log(math.tan(math.pi / 4 + math.radians(lat) / 2))
    georef = _georef("EPSG:3857", (1.0, 0.0, 1000000.0, 0.0, -1.0, y60 + 50.0))
    objs = [_obj(box(0, 0, 100, 100))]  # 10,000 map units², ~2,508 m²
    assert select_objects(objs, georef, simplify=0.0, min_area=2400) != []
    assert select_objects(objs, georef, simplify=0.0, min_area=3000) == []
