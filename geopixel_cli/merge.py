"""Seam merging: pieces of the same object predicted by neighbouring tiles become one object.

Two pieces from different tiles are the same object when they have the same category and
either (a) they overlap inside the two tiles' shared window region by at least
``MATCH_OVERLAP`` of the smaller piece's part in that region (an object inside an overlap,
or cut by one tile's edge and seen whole by the other), or (b) their core-clipped parts
share an edge (an object crossing a seam between tiles without overlap). Pieces with different
categories still match when their outlines inside the shared region have an IoU of at least
``DUPLICATE_IOU`` (one object that two tiles named differently). Matches are joined
transitively (union-find), so an object over a four-tile corner becomes one object.

The merged outline takes each pixel from the tile that owns it (its core) when that tile is
part of the group, and from any group member that saw it otherwise; so overlaps produce no
duplicate and an object only one tile saw is kept whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from geopixel_cli.tiling import PixelWindow, TileSpec
from geopixel_cli.vectorize import Piece

MATCH_OVERLAP = 0.25
DUPLICATE_IOU = 0.5


@dataclass(frozen=True)
class MergedObject:
    """One output object, still in scene pixel coordinates.

    Attributes:
        geometry: Polygon or MultiPolygon, scene pixels.
        phrase: Phrase of the representative piece (the largest contribution).
        category: The shared category.
        phrase_idx: Phrase index of the representative piece in its tile's caption.
        tile_id: Tile of the representative piece (its caption is the object's caption).
        tile_ids: Every tile that contributed a piece, ascending.
        score: Area-weighted mean score of the pieces.
    """

    geometry: Any
    phrase: str
    category: str
    phrase_idx: int
    tile_id: int
    tile_ids: tuple[int, ...]
    score: float


def _box(w: PixelWindow) -> Any:
    from shapely.geometry import box

    return box(*w.bounds)


def _polygonal(geom: Any) -> Any:
    """Keep only the polygonal part of a geometry (intersections may add lines or points)."""
    from shapely import get_parts, union_all
    from shapely.geometry import Polygon

    parts = [p for p in get_parts(geom) if isinstance(p, Polygon) and not p.is_empty]
    if not parts:
        return Polygon()
    # union, not MultiPolygon(parts): parts that share an edge would make an invalid MultiPolygon
    return parts[0] if len(parts) == 1 else union_all(parts)


def _is_match(a: Piece, b: Piece, tiles: dict[int, TileSpec]) -> bool:
    ta, tb = tiles[a.tile_id], tiles[b.tile_id]
    same = a.category == b.category
    shared = ta.window.intersection(tb.window)
    if shared is not None:
        region = _box(shared)
        # polygonal parts only: GEOS cannot overlay a mixed GeometryCollection (polygon + line/point)
        pa, pb = _polygonal(a.geometry.intersection(region)), _polygonal(b.geometry.intersection(region))
        inter = pa.intersection(pb).area
        smaller = min(pa.area, pb.area)
        if same and smaller > 0 and inter >= MATCH_OVERLAP * smaller:
            return True
        union = pa.area + pb.area - inter
        if union > 0 and inter >= DUPLICATE_IOU * union:
            return True  # the same outline seen by both tiles under two names
    if not same:
        return False
    qa = _polygonal(a.geometry.intersection(_box(ta.core)))
    qb = _polygonal(b.geometry.intersection(_box(tb.core)))
    return bool(qa.intersection(qb).length > 0)


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def match_groups(pieces: list[Piece], tiles: dict[int, TileSpec]) -> list[list[int]]:
    """Group pieces that are the same object across tiles.

    Args:
        pieces: All pieces of a scene, ordered by tile id.
        tiles: The grid by tile id.

    Returns:
        Groups of piece indexes, each ascending, ordered by their first index.
    """
    from shapely import STRtree

    parent = list(range(len(pieces)))
    if pieces:
        tree = STRtree([p.geometry for p in pieces])
        left, right = tree.query([p.geometry for p in pieces], predicate="intersects")
        for i, j in zip(left.tolist(), right.tolist(), strict=True):
            a, b = pieces[i], pieces[j]
            if i < j and a.tile_id != b.tile_id and _is_match(a, b, tiles):
                ri, rj = _find(parent, i), _find(parent, j)
                parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(len(pieces)):
        groups.setdefault(_find(parent, i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def _merge_group(members: list[Piece], tiles: dict[int, TileSpec]) -> MergedObject | None:
    from shapely import union_all

    if len(members) == 1:  # seen by one tile only: kept whole (it lies inside that tile's window)
        m = members[0]
        return MergedObject(m.geometry, m.phrase, m.category, m.phrase_idx, m.tile_id, (m.tile_id,), m.score)
    group_tiles = sorted({m.tile_id for m in members})
    parts, areas = [], []
    for m in members:
        others = [_box(tiles[t].core) for t in group_tiles if t != m.tile_id]
        region = _box(tiles[m.tile_id].window)
        if others:
            region = region.difference(union_all(others))
        part = _polygonal(m.geometry.intersection(region))
        parts.append(part)
        areas.append(part.area)
    geometry = _polygonal(union_all([p for p in parts if not p.is_empty]))
    if geometry.is_empty:
        return None
    weights = np.asarray(areas, np.float64)
    rep = members[int(np.argmax(weights))]
    score = float(np.dot(weights, [m.score for m in members]) / weights.sum())
    return MergedObject(
        geometry, rep.phrase, rep.category, rep.phrase_idx, rep.tile_id, tuple(group_tiles), score
    )


def merge_pieces(pieces: list[Piece], tiles: list[TileSpec]) -> list[MergedObject]:
    """Merge the pieces of a whole scene into objects (deterministic for the same pieces).

    Args:
        pieces: All pieces, ordered by tile id (order within a tile as vectorized).
        tiles: The scene's tile grid.

    Returns:
        The objects, ordered by the first piece of each.
    """
    by_id = {t.tile_id: t for t in tiles}
    objects = []
    for group in match_groups(pieces, by_id):
        merged = _merge_group([pieces[i] for i in group], by_id)
        if merged is not None:
            objects.append(merged)
    return objects
