"""Tile masks to polygon pieces in scene pixel coordinates, with phrase, category and score.

Pieces stay in scene pixel space (integer vertex coordinates, exact across tiles) until the
seam merge is done; ``layers.py`` maps them to CRS units at the very end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from geopixel_cli.tiling import TileSpec

# iSAID's 15 categories (what the released model was trained on) and the singular names that
# name them, matched as whole words (see category_of). Ambiguous bare words are left out:
# "track" (railway track), "pitch" (roof pitch).
CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "plane": ("plane", "airplane", "aeroplane", "aircraft", "airliner", "jet"),
    "ship": ("ship", "boat", "vessel", "yacht", "ferry"),
    "storage tank": ("storage tank", "tank", "silo"),
    "baseball diamond": ("baseball diamond", "baseball field", "baseball"),
    "tennis court": ("tennis court", "tennis"),
    "basketball court": ("basketball court", "basketball"),
    "ground track field": (
        "ground track field",
        "track field",
        "track and field",
        "running track",
        "athletic track",
        "athletics track",
    ),
    "harbor": ("harbor", "harbour", "dock", "pier", "marina"),
    "bridge": ("bridge", "overpass"),
    "large vehicle": ("large vehicle", "truck", "bus", "lorry", "trailer"),
    "small vehicle": ("small vehicle", "car", "vehicle", "van", "suv"),
    "helicopter": ("helicopter",),
    "roundabout": ("roundabout", "traffic circle"),
    "soccer field": ("soccer field", "football field", "soccer pitch", "football pitch", "soccer"),
    "swimming pool": ("swimming pool", "pool"),
}
# A name followed by one of these is a modifier of a place, not the object: "car park", "bus stop".
PLACE_WORDS = frozenset(
    "park parking lot wash station stop terminal depot yard ramp garage dealership pad shelter "
    "lane shadow".split()
)
# Words that end the head of a phrase: "a parking lot with cars" is about the parking lot.
HEAD_END = frozenset(
    "with in on at near along beside next by behind around inside within between across under "
    "that which where containing surrounded adjacent from".split()
)
_STOP = {"a", "an", "the", "of", "some", "several", "many", "few", "two", "three", "four", "five", "other"}
# Plurals the suffix rules get wrong, and singular words that end in "s".
_IRREGULAR = {
    "buses": "bus",
    "busses": "bus",
    "gases": "gas",
    "lenses": "lens",
    "campuses": "campus",
    "leaves": "leaf",
    "shelves": "shelf",
    "halves": "half",
    "people": "person",
    "men": "man",
    "women": "woman",
    "children": "child",
    "geese": "goose",
    "mice": "mouse",
    "series": "series",
    "species": "species",
}
# Longest names first, so "large vehicle" wins over "vehicle".
_NAMES = sorted(
    ((tuple(name.split()), category) for category, names in CATEGORY_WORDS.items() for name in names),
    key=lambda item: -len(item[0]),
)


@dataclass(frozen=True)
class Piece:
    """One connected region of one mask of one tile.

    Attributes:
        tile_id: The tile that predicted it.
        phrase_idx: Index of the grounded phrase in the tile's caption (0 for ``segment``).
        phrase: The phrase text (the expression for ``segment``).
        category: Normalised label used to decide which pieces may merge across seams.
        score: The model's confidence, 0-1 (predicted IoU, times the mean mask probability
            over the region when the model returns logits).
        geometry: Shapely polygon in scene pixel coordinates (x = column, y = row).
    """

    tile_id: int
    phrase_idx: int
    phrase: str
    category: str
    score: float
    geometry: Any


def singular(word: str) -> str:
    """The singular of a lower-case English noun (``"buses"`` -> ``"bus"``, ``"ferries"`` -> ``"ferry"``).

    Suffix rules plus a table of exceptions; words that already end in ``ss``/``us``/``is``
    (``grass``, ``campus``, ``tennis``) and words of three letters or fewer are kept.
    """
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 3 or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "shes", "ches", "xes", "zzes")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


def _head(words: list[str]) -> list[str]:
    """The phrase up to its first preposition or relative word (the whole phrase if it starts with one)."""
    for i, word in enumerate(words):
        if i > 0 and word in HEAD_END:
            return words[:i]
    return words


def _named_category(words: list[str]) -> str | None:
    """The iSAID category a whole-word name in ``words`` gives, longest name first, then leftmost."""
    for name, category in _NAMES:
        n = len(name)
        for i in range(len(words) - n + 1):
            following = words[i + n] if i + n < len(words) else None
            if tuple(words[i : i + n]) == name and following not in PLACE_WORDS:
                return category
    return None


def category_of(phrase: str) -> str:
    """Normalise a grounded phrase to a category for seam merging.

    Only the head of the phrase counts (up to its first preposition or relative word:
    ``"a parking lot with cars"`` is about the parking lot). An iSAID category when whole,
    singularised words of the head name one (``"two white buses"`` -> ``"large vehicle"``), but
    not when a place word follows the name (``"car park"``, ``"bus stop"``); else the head
    lower-cased, singularised, without articles and counts (``"the red roofs"`` -> ``"red roof"``).

    Args:
        phrase: Phrase text.

    Returns:
        The category.
    """
    words = _head([singular(w) for w in re.findall(r"[a-z]+", phrase.lower())])
    category = _named_category(words)
    if category is not None:
        return category
    kept = [w for w in words if w not in _STOP]
    return " ".join(kept) or "object"


def mask_polygons(mask: np.ndarray, *, col_off: int, row_off: int, min_pixels: int) -> list[Any]:
    """Connected regions of a mask as polygons (with holes) in scene pixel coordinates.

    Args:
        mask: (H, W) bool.
        col_off: Scene column of the mask's first column.
        row_off: Scene row of the mask's first row.
        min_pixels: Regions with fewer pixels are dropped as mask noise.

    Returns:
        Shapely polygons, in ``rasterio.features.shapes`` order (raster scan).
    """
    from affine import Affine
    from rasterio.features import shapes
    from shapely.geometry import shape

    if not mask.any():
        return []
    data = mask.astype(np.uint8)
    transform = Affine.translation(col_off, row_off)
    polygons = []
    for geom, _ in shapes(data, mask=mask, connectivity=4, transform=transform):
        poly = shape(geom)
        if poly.area >= min_pixels:
            polygons.append(poly)
    return polygons


def _region_scores(polys: list[Any], logits: np.ndarray, *, col_off: int, row_off: int) -> list[float]:
    """Mean sigmoid probability of ``logits`` (H, W) inside each polygon."""
    from affine import Affine
    from rasterio.features import rasterize

    labels = rasterize(
        [(p, i + 1) for i, p in enumerate(polys)],
        out_shape=logits.shape,
        transform=Affine.translation(col_off, row_off),
        dtype="int32",
    )
    prob = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    sums = np.bincount(labels.ravel(), weights=prob.ravel(), minlength=len(polys) + 1)
    counts = np.bincount(labels.ravel(), minlength=len(polys) + 1)
    return [float(sums[i + 1] / max(counts[i + 1], 1)) for i in range(len(polys))]


def tile_pieces(
    tile: TileSpec,
    result: Any,
    valid: np.ndarray,
    *,
    expression: str | None,
    min_pixels: int,
) -> list[Piece]:
    """All pieces of one tile's model result; predictions on nodata pixels are erased first.

    Args:
        tile: The tile.
        result: A ``GeoPixelResult`` for the tile's image.
        valid: (H, W) bool valid-pixel mask of the tile.
        expression: The referring expression (``segment``), or None (``describe``).
        min_pixels: Smallest region kept, pixels.

    Returns:
        The tile's pieces.
    """
    labels: dict[int, tuple[int, str]] = {}
    for idx, phrase in enumerate(result.phrases):
        if phrase.mask_index >= 0 and phrase.mask_index not in labels:
            labels[phrase.mask_index] = (idx, phrase.text)
    pieces: list[Piece] = []
    off = {"col_off": tile.window.col_off, "row_off": tile.window.row_off}
    for k in range(result.masks.shape[0]):
        if expression is not None:
            phrase_idx, text, category = 0, expression, expression
        elif k in labels:
            phrase_idx, text = labels[k]
            category = category_of(text)
        else:
            continue  # a [SEG] with no phrase names nothing
        polys = mask_polygons(result.masks[k] & valid, min_pixels=min_pixels, **off)
        base = float(result.scores[k]) if len(result.scores) > k else 1.0
        probs = [1.0] * len(polys)
        if result.mask_logits is not None and polys:
            probs = _region_scores(polys, result.mask_logits[k], **off)
        for poly, prob in zip(polys, probs, strict=True):
            pieces.append(Piece(tile.tile_id, phrase_idx, text, category, base * prob, poly))
    return pieces
