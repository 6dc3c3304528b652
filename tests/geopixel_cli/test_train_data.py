"""Training data: rasterisation parity, GeoPixelD/RLE/RRSIS-D readers, mixtures, bad input, synthetic data."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geopixel_cli.train.mixture import (
    Position,
    batch_indices,
    build_pool,
    entries_for,
    epoch_order,
    read_mixture,
)
from geopixel_cli.train.rasterize import mask_to_rle, polygons_to_mask, rle_to_mask
from geopixel_cli.train.records import TrainDataError, load_sample, read_json_list
from geopixel_cli.train.rrsisd import convert_rrsisd, rrsisd_records
from geopixel_cli.train.synthetic import write_dataset

GOLDEN = Path(__file__).resolve().parents[2] / ".." / "shared" / "golden" / "reference-tiny"


def _golden() -> Path:
    if not (GOLDEN / "train_sample.json").is_file():
        pytest.fail(f"golden fixtures missing at {GOLDEN}", pytrace=False)
    return GOLDEN


def test_fillpoly_matches_reference_masks():
    root = _golden()
    polygons = json.loads((root / "sample" / "P0224_0_800_0_800.json").read_text())["polygons"]
    areas = json.loads((root / "train_sample.json").read_text())["gt_mask_areas"]
    for k, mask_polys in enumerate(polygons):
        ours = polygons_to_mask(mask_polys, 800, 800)
        gt = np.asarray(Image.open(root / "sample" / f"gt_mask_{k}.png")) > 0
        assert int(ours.sum()) == areas[k]
        assert np.array_equal(ours.astype(bool), gt)


def test_fillpoly_simple_shapes():
    square = polygons_to_mask([[[2, 2], [5, 2], [5, 5], [2, 5]]], 8, 8)
    assert square.sum() == 16 and square[2:6, 2:6].all()
    # two polygons of one mask are OR-ed (no hole semantics)
    both = polygons_to_mask([[[0, 0], [3, 0], [3, 3], [0, 3]], [[1, 1], [2, 1], [2, 2], [1, 2]]], 6, 6)
    assert both[:4, :4].all() and both.sum() == 16


def test_rle_round_trip():
    mask = np.zeros((20, 30), np.uint8)
    mask[3:9, 4:20] = 1
    rle = mask_to_rle(mask)
    assert isinstance(rle["counts"], str)
    assert np.array_equal(rle_to_mask(rle, 20, 30), mask)
    with pytest.raises(ValueError, match="size"):
        rle_to_mask(rle, 21, 30)


def _sample_dataset(tmp_path: Path) -> Path:
    root = _golden()
    train = tmp_path / "data" / "GeoPixelD" / "train"
    train.mkdir(parents=True)
    for ext in ("png", "json"):
        shutil.copy(root / "sample" / f"P0224_0_800_0_800.{ext}", train)
    shutil.copy(root / "sample" / "GeoPixelD.json", tmp_path / "data" / "GeoPixelD.json")
    return tmp_path / "data" / "GeoPixelD.json"


def test_geopixeld_sample_reads_as_released(tmp_path):
    records = read_json_list(_sample_dataset(tmp_path))
    assert len(records) == 1 and records[0].n_seg == 4 and records[0].mask_kind == "polygons"
    sample = load_sample(records[0])
    assert sample.masks.shape == (4, 800, 800)
    assert sample.masks.reshape(4, -1).sum(1).tolist() == [17817, 2946, 2584, 2561]
    assert sample.conversations[0][0] == "user" and sample.conversations[1][0] == "assistant"


def _write_list(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


def _rle_record(image: str, n_masks: int = 1, size=(16, 16)) -> dict:
    mask = np.zeros(size, np.uint8)
    mask[2:6, 2:6] = 1
    return {
        "conversations": [
            {"from": "human", "value": "segment the thing"},
            {"from": "gpt", "value": "Sure, it is [SEG]."},
        ],
        "image": image,
        "segmentation": [mask_to_rle(mask)] * n_masks,
    }


@pytest.fixture()
def small_image(tmp_path: Path) -> Path:
    path = tmp_path / "img.png"
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(path)
    return path


def test_rle_records_and_errors(tmp_path, small_image):
    good = read_json_list(_write_list(tmp_path / "ok.json", [_rle_record("img.png")]))
    assert load_sample(good[0]).masks.sum() == 16
    with pytest.raises(TrainDataError, match=r"bad\.json\[0\].*1 \[SEG\].*2 masks"):
        read_json_list(_write_list(tmp_path / "bad.json", [_rle_record("img.png", n_masks=2)]))
    with pytest.raises(TrainDataError, match=r"miss\.json\[0\]: image not found"):
        read_json_list(_write_list(tmp_path / "miss.json", [_rle_record("nope.png")]))
    with pytest.raises(TrainDataError, match=r"size.*not the image"):
        read_json_list(_write_list(tmp_path / "sz.json", [_rle_record("img.png", size=(8, 8))]))


def test_malformed_json_and_bad_structure(tmp_path, small_image):
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(TrainDataError, match=r"broken\.json: malformed JSON"):
        read_json_list(tmp_path / "broken.json")
    with pytest.raises(TrainDataError, match="expected a JSON list"):
        read_json_list(_write_list(tmp_path / "obj.json", {"a": 1}))  # type: ignore[arg-type]
    rec = _rle_record("img.png")
    del rec["conversations"]
    with pytest.raises(TrainDataError, match=r"nc\.json\[0\]: 'conversations'"):
        read_json_list(_write_list(tmp_path / "nc.json", [rec]))


def test_polygons_outside_image_and_broken_polygon_file(tmp_path, small_image):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"polygons": [[[[1, 1], [40, 1], [40, 5]]]]}))
    rec = {
        "conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "<p> a </p> [SEG]"}],
        "image": "img.png",
        "polygons": "ann.json",
    }
    with pytest.raises(
        TrainDataError, match=r"out\.json\[0\] \(ann\.json\): mask 0 polygon 0.*\(40, 1\) outside"
    ):
        read_json_list(_write_list(tmp_path / "out.json", [rec]))
    ann.write_text("{not json")
    with pytest.raises(TrainDataError, match=r"malformed JSON in polygon file"):
        read_json_list(_write_list(tmp_path / "out2.json", [rec]))


def test_mixture_parsing_sampling_and_empty(tmp_path, small_image):
    lst = _write_list(tmp_path / "a.json", [_rle_record("img.png")] * 3)
    mix = tmp_path / "data.txt"
    mix.write_text("# comment\na.json 0.005\n")
    assert len(build_pool(read_mixture(mix), seed=0)) == 5  # 0.005 thousand = 5, topped up
    mix.write_text("a.json x2\n")
    assert len(build_pool(entries_for(mix), seed=0)) == 6
    assert len(build_pool(entries_for(lst), seed=0)) == 3
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(TrainDataError, match=r"empty\.txt: empty mixture"):
        entries_for(tmp_path / "empty.txt")
    (tmp_path / "bad.txt").write_text("a.json lots\n")
    with pytest.raises(TrainDataError, match=r"bad\.txt:1: sample count"):
        read_mixture(tmp_path / "bad.txt")


def test_data_order_is_a_function_of_the_position():
    assert epoch_order(10, seed=1, epoch=0) == epoch_order(10, seed=1, epoch=0)
    assert epoch_order(10, seed=1, epoch=0) != epoch_order(10, seed=1, epoch=1)
    r0 = batch_indices(10, Position(0, 1), seed=3, batch_size=2, rank=0, world_size=2)
    r1 = batch_indices(10, Position(0, 1), seed=3, batch_size=2, rank=1, world_size=2)
    assert not set(r0) & set(r1)


def _rrsisd_root(tmp_path: Path) -> Path:
    root = tmp_path / "rrsis"
    (root / "rrsisd").mkdir(parents=True)
    (root / "images" / "rrsisd" / "JPEGImages").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "images" / "rrsisd" / "JPEGImages" / "a.jpg")
    instances = {
        "images": [{"id": 7, "file_name": "a.jpg", "height": 32, "width": 32}],
        "annotations": [
            {
                "id": 3,
                "image_id": 7,
                "category_id": 1,
                "segmentation": [[4.0, 4.0, 20.0, 4.0, 20.0, 12.0, 4.0, 12.0]],
            }
        ],
        "categories": [{"id": 1, "name": "vehicle"}],
    }
    (root / "rrsisd" / "instances.json").write_text(json.dumps(instances))
    refs = [
        {
            "ref_id": 0,
            "ann_id": 3,
            "image_id": 7,
            "category_id": 1,
            "split": "train",
            "sentences": [
                {"sent": "the vehicle on the left", "raw": "The vehicle on the left"},
                {"sent": "a car", "raw": "A car"},
            ],
        },
        {"ref_id": 1, "ann_id": 3, "image_id": 7, "split": "test", "sentences": [{"sent": "x"}]},
    ]
    with (root / "rrsisd" / "refs(unc).p").open("wb") as fh:
        pickle.dump(refs, fh)
    return root


def test_rrsisd_native_and_converted(tmp_path):
    root = _rrsisd_root(tmp_path)
    records = rrsisd_records(root)
    assert len(records) == 2
    assert (
        records[0].conversations[0][1]
        == "Could you provide a segmentation mask for the vehicle on the left in this image?"
    )
    native = load_sample(records[0]).masks
    assert native.shape == (1, 32, 32) and native[0, 6, 10] == 1 and native[0, 20, 20] == 0
    n = convert_rrsisd(root, tmp_path / "rrsis.json", all_sentences=False)
    assert n == 1
    converted = load_sample(read_json_list(tmp_path / "rrsis.json")[0]).masks
    assert np.array_equal(converted, native)
    assert len(build_pool(entries_for(root), seed=0)) == 2  # a native root works as --data


def test_synthetic_dataset_is_consistent_and_deterministic(tmp_path):
    paths = write_dataset(tmp_path / "a", n=3, seed=5, size=128)
    write_dataset(tmp_path / "b", n=3, seed=5, size=128)
    assert (tmp_path / "a" / "GeoPixelD.json").read_text() == (tmp_path / "b" / "GeoPixelD.json").read_text()
    pool = build_pool(entries_for(paths["mixture"]), seed=0)
    assert len(pool) == 6
    for rec in pool:
        sample = load_sample(rec)
        assert sample.masks.shape[0] == rec.n_seg and (sample.masks.reshape(rec.n_seg, -1).sum(1) > 0).all()
    text = read_json_list(paths["gcg"])[0].conversations[1][1]
    assert "<p>" in text and "</p> [SEG]" in text
    ann = json.loads(next((tmp_path / "a" / "train").glob("*.json")).read_text())
    assert {"polygons", "instances", "gcg_description"} <= set(ann)


def test_data_subcommands(tmp_path):
    from typer.testing import CliRunner

    from geopixel_cli.train.data_command import data_app

    runner = CliRunner()
    res = runner.invoke(data_app, ["synth", str(tmp_path / "s"), "--n", "2", "--seed", "1", "--size", "64"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(data_app, ["check", str(tmp_path / "s" / "data.txt"), "--decode"])
    assert res.exit_code == 0 and "pool: 4 samples" in res.output
    root = _rrsisd_root(tmp_path)
    res = runner.invoke(data_app, ["convert-rrsisd", str(root), "-o", str(tmp_path / "r.json")])
    assert res.exit_code == 0 and "2 records" in res.output
    (tmp_path / "bad.txt").write_text("missing.json 1\n")
    res = runner.invoke(data_app, ["check", str(tmp_path / "bad.txt")])
    assert res.exit_code == 1 and "missing.json: dataset list not found" in res.output
