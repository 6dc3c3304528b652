"""Output layers: pixel-space objects to CRS units, metrics in metres, and atomic writes by format.

Layers: ``objects`` (MultiPolygon; phrase, category, caption_id, phrase_idx, tile_id, tile_ids,
score, area_m2, perimeter_m), ``tiles`` (footprint; status and caption) and ``runs`` (one row:
model, version, options, times). A GeoPackage holds all three; single-layer formats write
``objects`` at the output path, ``tiles`` beside it as ``<stem>_tiles<ext>`` and ``runs`` as
``<name>.runs.json`` (e.g. ``out.shp.runs.json``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from geopixel_cli.errors import UserError

DRIVERS = {
    ".gpkg": "GPKG",
    ".geojson": "GeoJSON",
    ".fgb": "FlatGeobuf",
    ".parquet": "Parquet",
    ".shp": "ESRI Shapefile",
}
SHAPEFILE_NAMES = {"perimeter_m": "perim_m"}  # every other field already fits in 10 characters
OBJECT_FIELDS = (
    "object_id",
    "phrase",
    "category",
    "caption_id",
    "phrase_idx",
    "tile_id",
    "tile_ids",
    "score",
    "area_m2",
    "perimeter_m",
)


@dataclass(frozen=True)
class _Measure:
    """How to measure CRS geometries: geodesic through ``to_lonlat`` + ``geod``, else planar × ``factor``."""

    to_lonlat: Any  # pyproj Transformer, CRS -> its geographic (lon, lat) CRS; None: planar
    geod: Any  # pyproj Geod of that CRS's ellipsoid; None: planar
    factor: float  # metres per CRS unit (planar fallback)


@dataclass(frozen=True)
class Georef:
    """How scene pixels map to the CRS, and how to measure in metres.

    Areas and perimeters are geodesic (on the ellipsoid of the CRS's datum) for every CRS with a
    geographic base: geographic CRSs and every projection (a conformal projection such as Web
    Mercator inflates areas by 4x at 60° latitude, so planar measures would be wrong). A CRS
    without a datum (a local engineering CRS) is measured in the plane, in its linear unit.

    Args:
        crs_wkt: Scene CRS as WKT, or None (pixel coordinates, metrics undefined).
        transform: ``(a, b, c, d, e, f)`` affine pixel -> CRS.
    """

    crs_wkt: str | None
    transform: tuple[float, float, float, float, float, float]

    def to_crs(self, geom: Any) -> Any:
        """Map a scene-pixel geometry through the geotransform.

        Without a CRS the geotransform still applies (a world file's units); a scene without
        any georeferencing has the identity transform, so its coordinates are pixels.
        """
        from shapely.affinity import affine_transform

        a, b, c, d, e, f = self.transform
        return affine_transform(geom, [a, b, d, e, c, f])

    @cached_property
    def _measure(self) -> _Measure | None:
        """Built once per Georef (parsing the CRS and building a transformer is slow)."""
        from pyproj import CRS, Transformer

        if self.crs_wkt is None:
            return None
        crs = CRS.from_wkt(self.crs_wkt)
        base = crs.geodetic_crs
        if base is not None and base.is_geographic:
            to_lonlat = Transformer.from_crs(crs, base, always_xy=True)
            return _Measure(to_lonlat, base.get_geod(), 1.0)
        factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
        return _Measure(None, None, factor)

    def metrics(self, geom: Any) -> tuple[float, float]:
        """``(area m², perimeter m)`` of a CRS geometry: geodesic with a datum; NaN without CRS."""
        import shapely

        measure = self._measure
        if measure is None:
            return math.nan, math.nan
        if measure.geod is None:
            return float(geom.area) * measure.factor**2, float(geom.length) * measure.factor
        to_lonlat = measure.to_lonlat

        def lonlat(xy: np.ndarray) -> np.ndarray:  # (N, 2) CRS -> (N, 2) lon, lat
            lon, lat = to_lonlat.transform(xy[:, 0], xy[:, 1])
            return np.column_stack([lon, lat])

        area, perimeter = measure.geod.geometry_area_perimeter(shapely.transform(geom, lonlat))
        return abs(float(area)), float(perimeter)


def check_output(path: Path, *, overwrite: bool) -> None:
    """Refuse an output we must not or cannot write, before any work starts.

    Args:
        path: Output path.
        overwrite: Whether an existing output may be replaced.

    Raises:
        UserError: Unsupported extension, existing output without ``--overwrite``, missing
            or unwritable directory.
    """
    if path.suffix.lower() not in DRIVERS:
        raise UserError(f"unsupported output format {path.suffix!r}; use one of {', '.join(DRIVERS)}")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"output directory {parent} is not writable")


def sidecars(path: Path) -> dict[str, Path]:
    """Files a run writes for ``path``: ``objects`` always, ``tiles``/``runs`` beside it unless GeoPackage."""
    if path.suffix.lower() == ".gpkg":
        return {"objects": path}
    return {
        "objects": path,
        "tiles": path.with_name(f"{path.stem}_tiles{path.suffix}"),
        "runs": path.with_name(f"{path.name}.runs.json"),
    }


@dataclass(frozen=True)
class OutputObject:
    """A merged object ready for the ``objects`` layer.

    Attributes:
        merged: The ``MergedObject`` (scene pixel coordinates, used for the mask raster).
        geometry: The outline in CRS units (simplified if asked).
        area_m2: Area, m² (NaN without a CRS).
        perimeter_m: Perimeter, m (NaN without a CRS).
    """

    merged: Any
    geometry: Any
    area_m2: float
    perimeter_m: float


def select_objects(
    objects: list[Any],
    georef: Georef,
    *,
    simplify: float,
    min_area: float,
    min_score: float = 0.0,
    top_k: int | None = None,
    by_score: bool = False,
) -> list[OutputObject]:
    """Map objects to the CRS, measure them and apply the filters.

    Args:
        objects: ``MergedObject`` list (scene pixel coordinates).
        georef: Scene georeferencing.
        simplify: Douglas-Peucker tolerance in map units (0: none); topology preserved.
        min_area: Objects smaller than this are dropped, m² (pixels² without a CRS).
        min_score: Objects scoring lower are dropped.
        top_k: Keep only the ``top_k`` best-scoring objects (None: all).
        by_score: Order by descending score (else keep the input order).

    Returns:
        The kept objects in output order (``object_id`` = position + 1).
    """
    kept = []
    for obj in objects:
        geom = georef.to_crs(obj.geometry)
        if simplify > 0:
            geom = geom.simplify(simplify, preserve_topology=True)
        if geom.is_empty or obj.score < min_score:
            continue
        area, perimeter = georef.metrics(geom)
        if (geom.area if math.isnan(area) else area) < min_area:
            continue
        kept.append(OutputObject(obj, geom, area, perimeter))
    if by_score or top_k is not None:
        order = sorted(range(len(kept)), key=lambda i: (-kept[i].merged.score, i))[:top_k]
        kept = [kept[i] for i in (order if by_score else sorted(order))]
    return kept


def objects_frame(objects: list[OutputObject], crs_wkt: str | None) -> Any:
    """GeoDataFrame of the ``objects`` layer, ``object_id`` numbered from 1 in list order."""
    import geopandas as gpd
    from shapely.geometry import MultiPolygon, Polygon

    rows, geoms = [], []
    for i, out in enumerate(objects):
        obj = out.merged
        geoms.append(MultiPolygon([out.geometry]) if isinstance(out.geometry, Polygon) else out.geometry)
        rows.append(
            {
                "object_id": i + 1,
                "phrase": obj.phrase,
                "category": obj.category,
                "caption_id": obj.tile_id,
                "phrase_idx": obj.phrase_idx,
                "tile_id": obj.tile_id,
                "tile_ids": ",".join(map(str, obj.tile_ids)),
                "score": round(obj.score, 6),
                "area_m2": out.area_m2,
                "perimeter_m": out.perimeter_m,
            }
        )
    frame = gpd.GeoDataFrame(rows, columns=list(OBJECT_FIELDS), geometry=gpd.GeoSeries(geoms, crs=crs_wkt))
    return frame.astype(
        {
            "object_id": "int64",
            "caption_id": "int64",
            "phrase_idx": "int64",
            "tile_id": "int64",
            "score": "float64",
            "area_m2": "float64",
            "perimeter_m": "float64",
        }
    )


def tiles_frame(records: list[dict[str, Any]], georef: Georef) -> Any:
    """GeoDataFrame of the ``tiles`` layer from per-tile records (window in pixels, caption)."""
    import geopandas as gpd
    from shapely.geometry import box

    columns = [
        "tile_id",
        "row",
        "col",
        "x_off",
        "y_off",
        "width",
        "height",
        "status",
        "caption",
        "n_phrases",
        "n_objects",
    ]
    geoms = [
        georef.to_crs(box(r["x_off"], r["y_off"], r["x_off"] + r["width"], r["y_off"] + r["height"]))
        for r in records
    ]
    rows = [{k: r[k] for k in columns} for r in records]
    return gpd.GeoDataFrame(rows, columns=columns, geometry=gpd.GeoSeries(geoms, crs=georef.crs_wkt))


def runs_frame(run: dict[str, Any]) -> Any:
    """DataFrame of the one-row ``runs`` layer; ``options`` is stored as a JSON string."""
    import pandas as pd

    row = dict(run)
    row["options"] = json.dumps(row.get("options", {}), sort_keys=True)
    return pd.DataFrame([row])


def _write_frame(frame: Any, path: Path, layer: str) -> None:
    import pyogrio

    suffix = path.suffix.lower()
    if layer == "runs" and suffix != ".gpkg":
        record = frame.to_dict(orient="records")[0]
        record["options"] = json.loads(record["options"])  # a JSON file holds the options as an object
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        return
    if suffix == ".geojson" and frame.crs is not None:
        frame = frame.to_crs(4326)  # RFC 7946
    if suffix == ".shp":
        frame = frame.rename(columns=SHAPEFILE_NAMES)
    if suffix == ".parquet":
        frame.to_parquet(path)
        return
    gtype = {"objects": "MultiPolygon", "tiles": "Polygon"}.get(layer)
    kwargs: dict[str, Any] = {"layer": layer} if suffix == ".gpkg" else {}
    if gtype is not None:
        kwargs["geometry_type"] = gtype
    pyogrio.write_dataframe(frame, path, driver=DRIVERS[suffix], **kwargs)


class Staging:
    """Outputs written into hidden folders beside their targets, then renamed into place together.

    Each target gets its own hidden folder in its directory (``.<name>.<random>.tmp/``, so no
    rename crosses a filesystem); a writer writes the target's file (and any siblings a format
    adds, e.g. a Shapefile's ``.shx``/``.dbf``/``.prj``) at :meth:`path`. :meth:`commit` moves
    everything staged into place, ``main`` last, so ``main`` appears only when every output is
    complete. Leaving the ``with`` block removes the hidden folders: on any failure before the
    commit no output is created or replaced.

    Args:
        main: The output whose presence means the run is complete (renamed last).
    """

    def __init__(self, main: Path) -> None:
        self.main = main
        self._staged: dict[Path, Path] = {}  # target -> its hidden folder

    def path(self, target: Path) -> Path:
        """Where to write ``target`` now (inside its hidden folder)."""
        if target not in self._staged:
            parent = target.parent if str(target.parent) else Path(".")
            self._staged[target] = Path(
                tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
            )
        return self._staged[target] / target.name

    def commit(self) -> list[Path]:
        """Rename every staged file into place, ``main`` last.

        Returns:
            The files now in place (a format's sibling files included), in rename order.
        """
        written = []
        for target in sorted(self._staged, key=lambda t: t == self.main):  # stable: staging order
            folder = self._staged[target]
            for file in sorted(folder.iterdir(), key=lambda f: (f.name == target.name, f.name)):
                os.replace(file, target.with_name(file.name))
                written.append(target.with_name(file.name))
        return written

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        for folder in self._staged.values():
            shutil.rmtree(folder, ignore_errors=True)


def write_layers(path: Path, frames: dict[str, Any], *, staging: Staging | None = None) -> list[Path]:
    """Write the layers of ``path`` (``objects`` at ``path``, ``tiles``/``runs`` beside it unless GeoPackage).

    Without ``staging`` the layers are written into hidden folders and renamed into place at
    once, ``objects`` last (nothing is left at the output paths on any failure). With a
    ``staging`` the files are only staged: the caller commits them together with its other
    outputs (see :class:`Staging`).

    Args:
        path: The output path (format by extension).
        frames: ``{"objects": ..., "tiles": ..., "runs": ...}``.
        staging: Stage into this instead of committing now.

    Returns:
        The files written (without ``staging``: every file, sibling files included; with it:
        the targets to be committed), output path last.
    """
    targets = sidecars(path)
    if staging is None:
        with Staging(path) as own:
            write_layers(path, frames, staging=own)
            return own.commit()
    for layer in ("tiles", "runs", "objects"):  # a GeoPackage holds all three at ``path``
        _write_frame(frames[layer], staging.path(targets.get(layer, path)), layer)
    return [p for layer, p in targets.items() if layer != "objects"] + [path]
