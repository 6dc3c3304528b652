"""Eval metrics without Java or torch: RLE checks, GLaMM's matchings, AP50, RRSIS, readers, errors.

Every number is compared with ../shared/golden/eval, produced by the reference code itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from geopixel_cli.errors import UserError
from geopixel_cli.eval.errors import EvalError
from geopixel_cli.eval.gcg import (
    coco_segm_stats,
    greedy_miou,
    greedy_recall_matches,
    iou_only_similarity,
    score_image,
)
from geopixel_cli.eval.gcg_data import (
    caption_from_text,
    load_gcg_ground_truth,
    load_gcg_predictions,
    phrases_from_text,
    resolve_splits,
)
from geopixel_cli.eval.rle import check_rle, decode_counts, encode_mask
from geopixel_cli.eval.rrsis import evaluate_rrsis, load_rrsis_ground_truth, load_rrsis_predictions

GOLDEN = Path(__file__).resolve().parents[2].parent / "shared" / "golden" / "eval"
EXACT = 1e-9


@pytest.fixture(scope="module")
def golden() -> Path:
    if not (GOLDEN / "gcg" / "expected.json").is_file():
        pytest.fail(f"golden eval fixtures not found at {GOLDEN} (check out ../shared)", pytrace=False)
    return GOLDEN


@pytest.fixture(scope="module")
def gcg(golden: Path):
    images = load_gcg_ground_truth(golden / "gcg")
    preds, extra = load_gcg_predictions(golden / "gcg" / "predictions", images)
    assert extra == []
    expected = json.loads((golden / "gcg" / "expected.json").read_text())
    sims = json.loads((golden / "gcg" / "text_similarity_minilm.json").read_text())["images"]
    return images, preds, expected, sims


def _golden_sim(sims: dict):
    def fn(labels: list[str], phrases: list[str]) -> np.ndarray:
        for rec in sims.values():
            if rec["gt_labels"] == labels and rec["pred_phrases"] == phrases:
                return np.asarray(rec["cosine"], np.float64).reshape(len(labels), len(phrases))
        raise AssertionError(f"no golden similarity for {labels} x {phrases}")

    return fn


# ---- RLE ------------------------------------------------------------------------------------


def test_rle_roundtrip_matches_pycocotools() -> None:
    rng = np.random.default_rng(0)
    for i in range(60):
        mask = rng.random((23, 31)) < rng.random()
        if i % 5 == 0:
            mask[:] = i % 2 == 0  # all zero / all one
        rle = encode_mask(mask)
        runs = decode_counts(rle["counts"])
        assert runs.sum() == 23 * 31
        assert check_rle({"size": [23, 31], "counts": runs.tolist()}, where="u")["counts"] == rle["counts"]


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ("abc", "ends inside"),
        ("0000\x7f", "alphabet"),
        ("Rj9d0d5", "pixels"),
        ("", "pixels"),
        ("0000", "pixels"),
    ],
)
def test_malformed_rle_names_the_record(counts: str, message: str) -> None:
    with pytest.raises(EvalError, match=f"pred 7.*{message}"):
        check_rle({"size": [40, 40], "counts": counts}, where="pred 7")


def test_rle_wrong_size_and_shape() -> None:
    rle = encode_mask(np.ones((10, 12), bool))
    with pytest.raises(EvalError, match="image X.*10x12 differs from the image size 10x10"):
        check_rle(rle, where="image X", size=(10, 10))
    with pytest.raises(EvalError, match="not a COCO RLE"):
        check_rle([1, 2], where="m")
    assert issubclass(EvalError, UserError)


# ---- GCG mask metrics -----------------------------------------------------------------------


def test_gcg_per_image_miou_and_recall_counts(gcg) -> None:
    images, preds, expected, sims = gcg
    fns = {"minilm_meanpool": _golden_sim(sims), "iou_only": iou_only_similarity}
    for im in images:
        got = score_image(im, preds[im.image_id], fns)
        want = expected["per_image"][im.image_id]
        assert got.miou == pytest.approx(want["mIoU"], abs=EXACT), im.image_id
        assert got.gt_phrases == want["gt_phrases"]
        assert got.true_positives == {
            "minilm_meanpool": want["tp_minilm_meanpool"],
            "iou_only": want["tp_iou_only"],
        }


def test_gcg_coco_stats_per_split(gcg, golden: Path) -> None:
    images, preds, expected, _ = gcg
    splits, rule = resolve_splits(images, golden / "gcg" / "splits.json")
    assert "split file" in rule
    got = coco_segm_stats(images, preds, splits)
    for name in ("overall", "uni_target", "multi_target"):
        want = expected["splits"][name]
        assert splits[name] == want["image_ids"]
        np.testing.assert_allclose(got[name], want["coco_segm_stats"], atol=EXACT, rtol=0)
        assert got[name][1] == pytest.approx(want["AP50"], abs=EXACT)


def test_one_phrase_rule_reproduces_golden_splits(gcg, golden: Path) -> None:
    images = gcg[0]
    by_rule, rule = resolve_splits(images, None)
    by_file, _ = resolve_splits(images, golden / "gcg" / "splits.json")
    assert by_rule == by_file and "inferred" in rule


def test_ap50_depends_on_emission_order(gcg) -> None:
    images, preds, expected, _ = gcg
    flipped = {k: type(p)(p.image_id, p.caption, p.phrases, p.masks[::-1]) for k, p in preds.items()}
    ap = coco_segm_stats(images, flipped, {"overall": [im.image_id for im in images]})["overall"][1]
    assert ap != pytest.approx(expected["splits"]["overall"]["AP50"], abs=1e-3)  # 0.667 -> 0.629


def test_no_masks_at_all_reports_zero(gcg) -> None:
    images, preds, _, _ = gcg
    empty = {k: type(p)(p.image_id, p.caption, p.phrases, []) for k, p in preds.items()}
    stats = coco_segm_stats(images, empty, {"overall": [im.image_id for im in images]})
    assert stats["overall"] == [0.0] * 12


def test_greedy_recall_quirks() -> None:
    ious = np.array([[0.9, 0.5], [0.6, 0.2]])  # (G, P)
    assert greedy_recall_matches(ious, np.ones((2, 2))) == 1  # 0.9 taken; next max 0.2 < 0.5 stops
    assert greedy_recall_matches(np.array([[0.5]]), np.array([[0.5]])) == 1  # both thresholds inclusive
    assert greedy_recall_matches(np.array([[0.4999]]), np.ones((1, 1))) == 0
    # best pair has a mismatched phrase: the loop stops even though another pair would pass
    assert greedy_recall_matches(np.array([[0.9, 0.8]]), np.array([[0.1, 0.9]])) == 0
    # a pair reaching a mask without a phrase: the reference's swallowed IndexError -> 0 TP
    assert greedy_recall_matches(np.array([[0.7, 0.9], [0.8, 0.0]]), np.ones((2, 1))) == 0
    assert (
        greedy_recall_matches(np.array([[0.9, 0.1]]), np.ones((1, 1))) == 1
    )  # phrase-less mask never picked


def test_greedy_miou_ties_and_no_overlap() -> None:
    assert greedy_miou(np.zeros((2, 3))) == 0.0
    assert greedy_miou(np.zeros((0, 3))) == 0.0
    # ties: first maximum in row-major order (0, 0) is taken, leaving only 0.01
    assert greedy_miou(np.array([[0.5, 0.5], [0.5, 0.01]])) == pytest.approx((0.5 + 0.01) / 2)
    assert greedy_miou(np.array([[0.9, 0.0], [0.0, 0.01]])) == pytest.approx((0.9 + 0.01) / 2)


# ---- GCG inputs ------------------------------------------------------------------------------


def test_glamm_response_cleaning() -> None:
    text = "The <p> tennis court-1 </p> [SEG] , <p> road </p> and\n<p>car </p>[SEG] here.[UNUSED_TOKEN_145]"
    assert phrases_from_text(text) == ["tennis court-1", "road", "car"]
    assert caption_from_text(text) == "The tennis court-1 , road andcar here."
    assert caption_from_text("'quoted'") == "quoted"


def _copy_gcg(golden: Path, tmp_path: Path) -> Path:
    shutil.copytree(golden / "gcg", tmp_path / "gcg")
    return tmp_path / "gcg"


def test_missing_prediction_is_an_error(golden: Path, tmp_path: Path) -> None:
    data = _copy_gcg(golden, tmp_path)
    (data / "predictions" / "P0103_0_200_0_200.json").unlink()
    images = load_gcg_ground_truth(data)
    with pytest.raises(EvalError, match="image P0103_0_200_0_200: no prediction"):
        load_gcg_predictions(data / "predictions", images)


def test_extra_prediction_is_ignored(golden: Path, tmp_path: Path, gcg) -> None:
    data = _copy_gcg(golden, tmp_path)
    extra = json.loads((data / "predictions" / "P0101_0_200_0_200.json").read_text())
    extra["image_id"] = "P9999_0_200_0_200"
    (data / "predictions" / "P9999_0_200_0_200.json").write_text(json.dumps(extra))
    preds, ignored = load_gcg_predictions(data / "predictions", load_gcg_ground_truth(data))
    assert ignored == ["P9999_0_200_0_200"] and set(preds) == set(gcg[1])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(image_id="P0102_0_200_0_200"), "does not match the GT image"),
        (
            lambda r: r["pred_masks"].append(encode_mask(np.ones((100, 200), bool))),
            r"pred_masks\[4\].*100x200",
        ),
        (lambda r: r["pred_masks"][0].update(counts="Rj9d0"), r"pred_masks\[0\]: malformed RLE"),
        (lambda r: r.update(phrases="road"), "'phrases' must be a list"),
        (lambda r: r.pop("caption"), "'caption' must be a string"),
    ],
)
def test_bad_prediction_record_names_it(golden: Path, tmp_path: Path, edit, message: str) -> None:
    data = _copy_gcg(golden, tmp_path)
    file = data / "predictions" / "P0104_0_200_0_200.json"
    record = json.loads(file.read_text())
    edit(record)
    file.write_text(json.dumps(record))
    with pytest.raises(EvalError, match=f"P0104_0_200_0_200.*{message}"):
        load_gcg_predictions(data / "predictions", load_gcg_ground_truth(data))


def test_gt_labels_must_align_with_masks(golden: Path, tmp_path: Path) -> None:
    data = _copy_gcg(golden, tmp_path)
    caps = json.loads((data / "test_gcg_coco_caption_gt.json").read_text())
    caps["annotations"][0]["labels"].append("extra")
    (data / "test_gcg_coco_caption_gt.json").write_text(json.dumps(caps))
    with pytest.raises(EvalError, match="GT image P0105_0_200_0_200: 3 labels but 2 mask annotations"):
        load_gcg_ground_truth(data)


def test_predictions_as_one_list_file(golden: Path, tmp_path: Path, gcg) -> None:
    records = [json.loads(p.read_text()) for p in sorted((golden / "gcg" / "predictions").glob("*.json"))]
    (tmp_path / "preds.json").write_text(json.dumps(records[::-1]))
    preds, _ = load_gcg_predictions(tmp_path / "preds.json", gcg[0])
    assert {k: (p.caption, p.phrases, p.masks) for k, p in preds.items()} == {
        k: (p.caption, p.phrases, p.masks) for k, p in gcg[1].items()
    }


# ---- RRSIS -----------------------------------------------------------------------------------


def _check_rrsis(got: dict, want: dict) -> None:
    for key in ("P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "oIoU", "mIoU"):
        assert got[key] == pytest.approx(want[key], abs=EXACT), key
    assert (got["cum_I"], got["cum_U"], got["num_samples"]) == (
        want["cum_I"],
        want["cum_U"],
        want["num_samples"],
    )
    assert got["per_sample_iou"].keys() == want["per_sample_iou"].keys()
    for sid, iou in want["per_sample_iou"].items():
        assert got["per_sample_iou"][sid] == pytest.approx(iou, abs=EXACT), sid


def test_rrsis_golden(golden: Path) -> None:
    samples = load_rrsis_ground_truth(golden / "rrsis" / "gt.json")
    preds, extra = load_rrsis_predictions(golden / "rrsis" / "predictions.json", samples)
    want = json.loads((golden / "rrsis" / "expected.json").read_text())
    got = evaluate_rrsis(samples, preds)
    assert extra == []
    _check_rrsis(got, want)
    _check_rrsis(got["variants"]["rmsin_resize_480_nearest"], want["variants"]["rmsin_resize_480_nearest"])


def test_rrsis_missing_duplicate_and_wrong_size(golden: Path, tmp_path: Path) -> None:
    samples = load_rrsis_ground_truth(golden / "rrsis" / "gt.json")
    records = json.loads((golden / "rrsis" / "predictions.json").read_text())["predictions"]
    cases = [
        (records[1:], "sample r01: no prediction"),
        (records + [records[3]], "two predictions for sample r04"),
        (
            [
                {**r, "mask": encode_mask(np.zeros((20, 20), bool))} if r["sample_id"] == "r05" else r
                for r in records
            ],
            "sample r05.*20x20 differs",
        ),
    ]
    for recs, message in cases:
        (tmp_path / "p.json").write_text(json.dumps({"predictions": recs}))
        with pytest.raises(EvalError, match=message):
            load_rrsis_predictions(tmp_path / "p.json", samples)


def test_text_model_auto_falls_back_to_packaged_minilm(monkeypatch: pytest.MonkeyPatch) -> None:
    from geopixel_cli.eval import textsim

    loaded: list[str] = []

    def fake_load(name: str):
        loaded.append(name)
        if name == textsim.REFERENCE_MODEL:
            raise OSError("not cached and offline")
        return f"encoder:{name}"

    monkeypatch.setattr(textsim, "load_encoder", fake_load)
    chosen = textsim.resolve_text_model("auto")
    assert loaded == [textsim.REFERENCE_MODEL, textsim.minilm_path()]
    assert chosen.variant == "minilm_meanpool" and chosen.similarity == f"encoder:{textsim.minilm_path()}"
    assert "bert-base-uncased not available" in chosen.note and "all-MiniLM-L6-v2" in chosen.note
    assert textsim.resolve_text_model("iou-only").variant is None
    with pytest.raises(EvalError, match="not a Hugging Face model directory"):
        textsim.resolve_text_model(str(Path(__file__).parent))
