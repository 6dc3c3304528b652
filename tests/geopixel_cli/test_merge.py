import numpy as np
import pytest
from shapely.geometry import box

from geopixel_cli.merge import merge_pieces
from geopixel_cli.tiling import grid
from geopixel_cli.vectorize import Piece, category_of, mask_polygons, singular


def _perfect_pieces(tiles, rects, *, category="red roof", grow=None):
    """What a perfect per-tile segmenter reports: each rect clipped to each tile window that sees it."""
    pieces = []
    for t in tiles:
        for k, (x0, y0, x1, y1) in enumerate(rects):
            g = grow.get(t.tile_id, 0) if grow else 0
            part = box(x0 - g, y0 - g, x1 + g, y1 + g).intersection(box(*t.window.bounds))
            if part.area > 0:
                cat = category if isinstance(category, str) else category[k]
                pieces.append(Piece(t.tile_id, 0, cat, cat, 0.5 + 0.01 * t.tile_id, part))
    return pieces


def _assert_same(objects, rects):
    assert len(objects) == len(rects)
    for rect in rects:
        target = box(*rect)
        matches = [
            o for o in objects if o.geometry.intersects(target) and o.geometry.intersection(target).area > 0
        ]
        assert len(matches) == 1, rect
        assert matches[0].geometry.symmetric_difference(target).area == pytest.approx(0.0)


# 517 x 433, tile 200, overlap 40: windows start at 0/160/317 (x) and 0/160/233 (y);
# cores cut at x 180, 338 and y 180, 296.
TILES = grid(517, 433, tile_size=200, overlap=40)
CASES = {
    "cut by a window edge": [(150, 50, 230, 90)],
    "inside an overlap": [(165, 100, 195, 130)],
    "four-tile corner": [(170, 165, 215, 215)],
    "spans three tiles": [(10, 10, 400, 30)],
    "snapped last column": [(300, 300, 480, 330)],
    "inside one tile": [(20, 40, 60, 70)],
}


@pytest.mark.parametrize("name", list(CASES))
def test_objects_across_seams_become_one(name):
    rects = CASES[name]
    objects = merge_pieces(_perfect_pieces(TILES, rects), TILES)
    _assert_same(objects, rects)


def test_all_cases_together_no_duplicates():
    rects = [r for rs in CASES.values() for r in rs]
    objects = merge_pieces(_perfect_pieces(TILES, rects), TILES)
    _assert_same(objects, rects)


def test_seams_without_overlap_merge_by_shared_edge():
    tiles = grid(400, 400, tile_size=200, overlap=0)
    rects = [(150, 150, 250, 260), (10, 190, 60, 210), (300, 10, 320, 30)]
    objects = merge_pieces(_perfect_pieces(tiles, rects), tiles)
    _assert_same(objects, rects)
    corner = next(o for o in objects if o.geometry.contains(box(190, 190, 210, 210)))
    assert corner.tile_ids == (0, 1, 2, 3)


def test_different_categories_touching_stay_apart():
    rects = [(150, 50, 190, 90), (190, 50, 230, 90)]
    pieces = _perfect_pieces(TILES, rects, category=["red roof", "storage tank"])
    objects = merge_pieces(pieces, TILES)
    assert sorted(o.category for o in objects) == ["red roof", "storage tank"]
    _assert_same(objects, rects)


def test_disagreeing_tiles_merge_and_owner_wins_in_its_core():
    rect = (150, 50, 230, 90)
    pieces = _perfect_pieces(TILES, [rect], grow={0: 3})  # tile 0 predicts 3 px too wide
    objects = merge_pieces(pieces, TILES)
    assert len(objects) == 1
    geom = objects[0].geometry
    # right part (x >= 180) is owned by tile 1 and exact; left part comes from tile 0 (grown)
    assert geom.intersection(box(180, 0, 517, 433)).symmetric_difference(box(180, 50, 230, 90)).area == 0
    assert geom.bounds == (147.0, 47.0, 230.0, 93.0)


def test_neighbours_that_do_not_overlap_enough_stay_apart():
    # two separate cars inside the overlap strip, each seen by both tiles
    rects = [(165, 10, 175, 20), (185, 10, 195, 20)]
    objects = merge_pieces(_perfect_pieces(TILES, rects), TILES)
    _assert_same(objects, rects)


def test_score_and_representative():
    rect = (150, 50, 230, 90)
    objects = merge_pieces(_perfect_pieces(TILES, [rect]), TILES)
    obj = objects[0]
    assert obj.tile_ids == (0, 1)
    # contributions: tile 0 owns x 150..180 (30 px wide), tile 1 x 180..230 (50 px wide)
    assert obj.tile_id == 1
    assert obj.score == pytest.approx((30 * 0.50 + 50 * 0.51) / 80)


def test_mask_polygons_scene_coordinates_and_holes():
    mask = np.zeros((20, 30), bool)
    mask[2:12, 5:25] = True
    mask[5:8, 10:14] = False  # a hole
    mask[15, 0] = True  # one-pixel noise
    polys = mask_polygons(mask, col_off=100, row_off=200, min_pixels=4)
    assert len(polys) == 1
    assert polys[0].bounds == (105.0, 202.0, 125.0, 212.0)
    assert polys[0].area == 200 - 12
    assert len(polys[0].interiors) == 1


@pytest.mark.parametrize(
    "phrase,category",
    [
        ("two white cars", "small vehicle"),
        ("a storage tank", "storage tank"),
        ("Storage Tanks", "storage tank"),
        ("the red roofs", "red roof"),
        ("a large harbour", "harbor"),
        ("", "object"),
        # place words after a name: the place, not the object
        ("a car park", "car park"),
        ("car parks", "car park"),
        ("a bus stop", "bus stop"),
        ("a helicopter pad", "helicopter pad"),
        # ambiguous bare words are not categories
        ("a railway track", "railway track"),
        ("railway tracks", "railway track"),
        ("the roof pitch", "roof pitch"),
        ("a running track", "ground track field"),
        ("a football pitch", "soccer field"),
        # plurals
        ("buses", "large vehicle"),
        ("several white buses", "large vehicle"),
        ("ferries", "ship"),
        ("boxes", "box"),
        ("churches", "church"),
        ("houses", "house"),
        ("green grass", "green grass"),
        ("tennis courts", "tennis court"),
        # the longest name wins, whole words only
        ("large vehicles", "large vehicle"),
        ("vehicles", "small vehicle"),
        ("a carpet", "carpet"),
        ("shipyards", "shipyard"),
        # only the head of the phrase counts
        ("cars parked along the road", "small vehicle"),
        ("a parking lot with cars", "parking lot"),
        ("ships in the harbor", "ship"),
        ("a tennis court next to a swimming pool", "tennis court"),
        ("a group of ships", "ship"),
    ],
)
def test_category_of(phrase, category):
    assert category_of(phrase) == category


@pytest.mark.parametrize(
    "word,one",
    [("buses", "bus"), ("bus", "bus"), ("lorries", "lorry"), ("glasses", "glass"), ("tennis", "tennis")]
    + [
        ("campus", "campus"),
        ("benches", "bench"),
        ("suvs", "suv"),
        ("aircraft", "aircraft"),
        ("ties", "tie"),
    ],
)
def test_singular(word, one):
    assert singular(word) == one


def test_tile_pieces_scores_nodata_and_labels():
    from geopixel.result import GeoPixelResult, Phrase

    from geopixel_cli.tiling import PixelWindow, TileSpec
    from geopixel_cli.vectorize import tile_pieces

    tile = TileSpec(5, 0, 1, PixelWindow(100, 0, 40, 30), PixelWindow(110, 0, 30, 30))
    masks = np.zeros((3, 30, 40), bool)
    masks[0, 2:6, 2:12] = True  # region a
    masks[0, 20:25, 30:38] = True  # region b, half on nodata
    masks[1, 10:14, 10:14] = True  # a [SEG] without a phrase: ignored
    masks[2, 0:3, 0:3] = True  # one pixel after nodata erase: too small
    logits = np.full((3, 30, 40), -20.0, np.float32)
    logits[0, 2:6, 2:12] = 0.0  # sigmoid 0.5
    logits[0, 20:25, 30:38] = 20.0  # sigmoid ~1
    valid = np.ones((30, 40), bool)
    valid[:, 34:] = False
    valid[:2, :2] = False
    valid[2, :3] = False
    valid[:3, 2] = False
    result = GeoPixelResult(
        text="<p> two cars </p> [SEG] x [SEG] <p> a pool </p> [SEG]",
        phrases=[Phrase("two cars", 4, 12, 0), Phrase("a pool", 35, 41, 2)],
        masks=masks,
        scores=np.asarray([0.8, 0.7, 0.9], np.float32),
        token_ids=[],
        mask_logits=logits,
    )
    pieces = tile_pieces(tile, result, valid, expression=None, min_pixels=4)
    assert [(p.phrase, p.category, p.phrase_idx) for p in pieces] == [("two cars", "small vehicle", 0)] * 2
    a, b = sorted(pieces, key=lambda p: p.geometry.bounds[1])
    assert a.geometry.bounds == (102.0, 2.0, 112.0, 6.0) and a.score == pytest.approx(0.4)
    assert b.geometry.bounds == (130.0, 20.0, 134.0, 25.0) and b.score == pytest.approx(0.8)
    seg = tile_pieces(tile, result, valid, expression="cars", min_pixels=4)
    assert {p.phrase for p in seg} == {"cars"} and len(seg) == 3  # every mask counts for segment


def test_same_outline_named_differently_by_two_tiles_is_one_object():
    rect = (170, 100, 200, 130)  # inside the overlap of tiles 0 and 1 (x 160-200)
    pieces = [
        Piece(0, 0, "a building", "building", 0.6, box(*rect)),
        Piece(1, 2, "red roofs", "red roof", 0.8, box(*rect)),
    ]
    objects = merge_pieces(pieces, TILES)
    assert len(objects) == 1 and objects[0].tile_ids == (0, 1)
    # tile 0 owns x < 180 and tile 1 the rest: tile 1 contributes more, so it names the object
    assert objects[0].category == "red roof" and objects[0].phrase_idx == 2
