"""Native dataset readers of ``geopixel eval``: a GeoPixelD test folder and an RRSIS-D folder.

Both fixtures are small synthetic datasets written here in the datasets' own layouts
(shared/reference/DATASETS.md); the real sample patch of GeoPixelD is read as well.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from geopixel_cli.eval.errors import EvalError
from geopixel_cli.eval.gcg import coco_segm_stats, iou_only_similarity, score_image
from geopixel_cli.eval.gcg_data import GcgPrediction, load_gcg_ground_truth, resolve_splits
from geopixel_cli.eval.rle import decode_masks
from geopixel_cli.eval.rrsis import evaluate_rrsis, load_rrsis_ground_truth

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "sample-GeoPixelD"

RECT = [[10, 10], [49, 10], [49, 29], [10, 29]]
TRI = [[60, 60], [90, 60], [60, 90]]


def _write_patch(
    folder: Path, name: str, description: str, polygons: list, size: tuple[int, int] = (100, 120)
) -> None:
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(folder / f"{name}.png")
    record = {
        "id": 0,
        "img": f"data/GeoPixelD/test/{name}.png",
        "gcg_description": description,
        "polygons": polygons,
    }
    (folder / f"{name}.json").write_text(json.dumps(record))


@pytest.fixture()
def geopixeld(tmp_path: Path) -> Path:
    test = tmp_path / "GeoPixelD" / "test"
    test.mkdir(parents=True)
    _write_patch(
        test,
        "P0002_0_100_0_120",
        "A <p> tennis court-1 </p> [SEG] , and <p> small vehicles </p> [SEG] here.",
        [[RECT], [TRI, [[100, 5], [115, 5], [115, 20]]]],
    )
    _write_patch(test, "P0001_0_100_0_120", "One <p> ship </p> [SEG] .", [[TRI]])
    return tmp_path / "GeoPixelD"


def test_geopixeld_folder_as_ground_truth(geopixeld: Path) -> None:
    images = load_gcg_ground_truth(geopixeld)  # the dataset root: its test/ folder is used
    assert [im.image_id for im in images] == ["P0001_0_100_0_120", "P0002_0_100_0_120"]
    two = images[1]
    assert two.labels == ["tennis court-1", "small vehicles"]
    assert two.caption == "A tennis court-1 , and small vehicles here."  # tags removed, whitespace collapsed
    assert (two.height, two.width) == (100, 120)
    masks = decode_masks(two.masks, (100, 120))
    want = mask_utils.decode(mask_utils.frPyObjects([sum(RECT, [])], 100, 120))[..., 0]
    assert np.array_equal(masks[0], want) and masks[0].sum() == 39 * 19  # OpenCV's fillPoly: 40 x 20
    union = mask_utils.decode(
        mask_utils.merge(mask_utils.frPyObjects([sum(TRI, []), [100, 5, 115, 5, 115, 20]], 100, 120))
    )
    assert np.array_equal(masks[1], union)  # one mask per phrase = union of its polygons
    assert two.anns[1]["area"] == float(union.sum())
    splits, _ = resolve_splits(images, None)
    assert splits["uni_target"] == ["P0001_0_100_0_120"] and splits["multi_target"] == ["P0002_0_100_0_120"]


def test_geopixeld_gt_as_prediction_is_perfect(geopixeld: Path) -> None:
    images = load_gcg_ground_truth(geopixeld / "test")
    preds = {im.image_id: GcgPrediction(im.image_id, im.caption, im.labels, im.masks) for im in images}
    ids = [im.image_id for im in images]
    assert coco_segm_stats(images, preds, {"overall": ids})["overall"][1] == 1.0
    for im in images:
        s = score_image(im, preds[im.image_id], {"iou_only": iou_only_similarity})
        assert s.miou == 1.0 and s.true_positives["iou_only"] == len(im.labels)


def test_geopixeld_phrase_polygon_mismatch(geopixeld: Path) -> None:
    _write_patch(geopixeld / "test", "P0003_0_100_0_120", "<p> a </p> [SEG] <p> b </p> [SEG]", [[RECT]])
    with pytest.raises(EvalError, match="P0003_0_100_0_120.json: 2 phrases, 2 \\[SEG\\] and 1 polygon lists"):
        load_gcg_ground_truth(geopixeld)


def test_real_geopixeld_sample_patch() -> None:
    if not (SAMPLE / "README.md").is_file():
        pytest.fail(f"{SAMPLE} not found (check out ../shared)", pytrace=False)
    (image,) = load_gcg_ground_truth(SAMPLE / "data" / "GeoPixelD" / "train")
    assert image.labels == ["tennis court-1", "tennis court-2", "tennis court-3", "tennis court-4"]
    assert image.anns[0]["area"] == 17533.0  # DATASETS.md 1.5: pycocotools' fill of mask 0
    assert image.anns[0]["bbox"] == [688.0, 380.0, 97.0, 195.0]


@pytest.fixture()
def rrsisd(tmp_path: Path) -> Path:
    root = tmp_path / "RRSIS-D"
    (root / "rrsisd").mkdir(parents=True)
    (root / "images" / "rrsisd" / "JPEGImages").mkdir(parents=True)
    a = [10, 10, 40, 10, 40, 40, 10, 40]
    b = [30, 30, 60, 30, 60, 60, 30, 60]  # overlaps a on 10x10 pixels
    instances = {
        "images": [{"id": 7, "file_name": "00007.jpg", "height": 80, "width": 90}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "segmentation": [a, b]},
            {"id": 2, "image_id": 7, "category_id": 1, "segmentation": [b]},
        ],
        "categories": [{"id": 1, "name": "vehicle"}],
    }
    refs = [
        {
            "ref_id": 0,
            "ann_id": 1,
            "image_id": 7,
            "split": "test",
            "sentences": [
                {"raw": "the two boxes", "sent": "the two boxes", "sent_id": 100},
                {"raw": "both boxes ", "sent": "both boxes", "sent_id": 101},
            ],
        },
        {
            "ref_id": 1,
            "ann_id": 2,
            "image_id": 7,
            "split": "train",
            "sentences": [{"raw": "lower box", "sent": "lower box", "sent_id": 102}],
        },
    ]
    (root / "rrsisd" / "instances.json").write_text(json.dumps(instances))
    with (root / "rrsisd" / "refs(unc).p").open("wb") as fh:
        pickle.dump(refs, fh)
    return root


def test_rrsisd_reader(rrsisd: Path) -> None:
    samples = load_rrsis_ground_truth(rrsisd, split="test")
    assert [(s.sample_id, s.ref_id, s.sentence) for s in samples] == [
        ("0_100", "0", "the two boxes"),
        ("0_101", "0", "both boxes"),
    ]
    assert samples[0].image_path == rrsisd / "images" / "rrsisd" / "JPEGImages" / "00007.jpg"
    mask = decode_masks([samples[0].mask], (80, 90))[0]
    comps = mask_utils.decode(
        mask_utils.frPyObjects([[10, 10, 40, 10, 40, 40, 10, 40], [30, 30, 60, 30, 60, 60, 30, 60]], 80, 90)
    )
    assert np.array_equal(mask, comps.sum(axis=2) == 1)  # RMSIN keeps pixels equal to 1: overlap drops out
    assert mask.sum() < comps.any(axis=2).sum()
    report = evaluate_rrsis(samples, {s.sample_id: s.mask for s in samples})
    assert report["num_samples"] == 2 and report["mIoU"] == 1.0
    assert [s.sample_id for s in load_rrsis_ground_truth(rrsisd, split="train")] == ["1_102"]
    with pytest.raises(EvalError, match="no refs with split 'val'"):
        load_rrsis_ground_truth(rrsisd, split="val")
