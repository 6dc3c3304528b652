"""``geopixel eval --model``: running a model over a dataset, saving and re-scoring its predictions.

Two models: an oracle that answers with the ground truth through GeoPixel's result type (perfect
predictions must get perfect scores, which checks the answer -> record conversion), and the real
``geopixel.GeoPixel`` loaded from the tiny reference checkpoint (random weights) through the CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from geopixel.result import GeoPixelResult
from PIL import Image
from typer.testing import CliRunner

from geopixel_cli.cli import app
from geopixel_cli.eval.api import run_eval
from geopixel_cli.eval.gcg_data import GcgImage, load_gcg_ground_truth
from geopixel_cli.eval.rle import decode_masks
from geopixel_cli.eval.rrsis import RrsisSample, load_rrsis_ground_truth

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "golden"
GOLDEN = SHARED / "eval"
TINY = SHARED / "reference-tiny"


@pytest.fixture(scope="module", autouse=True)
def _fixtures() -> None:
    if not (GOLDEN / "gcg" / "expected.json").is_file() or not (TINY / "config.json").is_file():
        pytest.fail(f"golden fixtures not found under {SHARED} (check out ../shared)", pytrace=False)


def _tagged(image: GcgImage) -> str:
    """The GT caption with each label wrapped as GeoPixel answers: ``<p> label </p> [SEG]``."""
    text, pos = image.caption, 0
    for label in image.labels:
        at = text.index(label, pos)
        tagged = f"<p> {label} </p> [SEG]"
        text = text[:at] + tagged + text[at + len(label) :]
        pos = at + len(tagged)
    return text


class OracleModel:
    """Answers with the ground truth; image k of the dataset is filled with pixel value k."""

    def __init__(self, gcg: list[GcgImage] | None = None, rrsis: list[RrsisSample] | None = None) -> None:
        self.gcg, self.rrsis = gcg or [], rrsis or []
        self.calls: list[int] = []

    def _result(self, text: str, masks: np.ndarray) -> GeoPixelResult:
        return GeoPixelResult(
            text=text,
            phrases=[],
            masks=masks.astype(bool),
            scores=np.ones(len(masks), np.float32),
            token_ids=[],
        )

    def describe_batch(self, images, *, prompt=None, hd_num=9, max_new_tokens=1024):
        self.calls.append(len(images))
        out = []
        for rgb in images:
            gt = self.gcg[int(rgb[0, 0, 0])]
            out.append(self._result(_tagged(gt), decode_masks(gt.masks, (gt.height, gt.width))))
        return out

    def segment_batch(self, images, expression, *, hd_num=9, max_new_tokens=64):
        self.calls.append(len(images))
        out = []
        for rgb, sentence in zip(images, expression, strict=True):
            s = self.rrsis[int(rgb[0, 0, 0])]
            assert sentence == s.sentence
            gt = decode_masks([s.mask], (s.height, s.width))
            out.append(self._result("Sure, it is [SEG].", gt))
        return out


def _write_image(path: Path, value: int, size: tuple[int, int]) -> None:
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)


@pytest.fixture()
def gcg_with_images(tmp_path: Path) -> Path:
    data = tmp_path / "gcg"
    data.mkdir()
    for name in ("test_gcg_coco_mask_gt.json", "test_gcg_coco_caption_gt.json"):
        shutil.copy(GOLDEN / "gcg" / name, data / name)
    for k, im in enumerate(load_gcg_ground_truth(data)):
        _write_image(data / f"{im.image_id}.png", k, (im.height, im.width))
    return data


@pytest.fixture()
def rrsis_with_images(tmp_path: Path) -> Path:
    gt = json.loads((GOLDEN / "rrsis" / "gt.json").read_text())
    (tmp_path / "images").mkdir()
    for k, s in enumerate(gt["samples"]):
        s["file_name"] = f"images/{s['sample_id']}.png"
        _write_image(tmp_path / s["file_name"], k, (s["height"], s["width"]))
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    return tmp_path / "gt.json"


def test_gcg_oracle_scores_perfectly_and_round_trips(gcg_with_images: Path, tmp_path: Path) -> None:
    images = load_gcg_ground_truth(gcg_with_images)
    saved = tmp_path / "preds"
    report = run_eval(
        "gcg",
        gcg_with_images,
        model=OracleModel(gcg=images),
        text_model="iou-only",
        save_predictions=saved,
        batch_size=3,
    )
    overall = report["splits"]["overall"]
    assert overall["AP50"] == 1.0 and overall["mIoU"] == 1.0
    assert overall["recall"]["iou_only"] == {"recall": 1.0, "true_positives": 14, "gt_phrases": 14}
    assert report["caption"]["CIDEr"] == pytest.approx(10.0) and report["caption"]["METEOR"] == pytest.approx(
        1.0
    )
    assert report["meta"]["split_rule"].startswith("one GT phrase")  # no splits.json in this folder
    record = json.loads((saved / "P0104_0_200_0_200.json").read_text())
    assert record["phrases"] == images[-1].labels and len(record["pred_masks"]) == 3
    rescored = run_eval("gcg", gcg_with_images, predictions=saved, text_model="iou-only")
    assert {k: v for k, v in rescored.items() if k != "meta"} == {
        k: v for k, v in report.items() if k != "meta"
    }


def test_rrsis_oracle_and_empty_union(rrsis_with_images: Path, tmp_path: Path) -> None:
    samples = load_rrsis_ground_truth(rrsis_with_images)
    model = OracleModel(rrsis=samples)
    report = run_eval(
        "rrsis", rrsis_with_images, model=model, batch_size=5, save_predictions=tmp_path / "p.json"
    )
    assert model.calls == [5, 5, 2]
    ious = dict(report["per_sample_iou"])
    assert ious.pop("r09") == 0.0  # empty GT and empty prediction: RMSIN counts IoU 0
    assert set(ious.values()) == {1.0}
    assert report["P@0.9"] == pytest.approx(11 / 12) and report["oIoU"] == 1.0
    rescored = run_eval("rrsis", rrsis_with_images, predictions=tmp_path / "p.json")
    assert rescored["per_sample_iou"] == report["per_sample_iou"]


def test_model_mode_checks_image_sizes(rrsis_with_images: Path) -> None:
    _write_image(rrsis_with_images.parent / "images" / "r03.png", 2, (100, 120))
    samples = load_rrsis_ground_truth(rrsis_with_images)
    from geopixel_cli.eval.errors import EvalError

    with pytest.raises(EvalError, match="sample r03: image r03.png is 100x120, GT masks are 200x200"):
        run_eval("rrsis", rrsis_with_images, model=OracleModel(rrsis=samples))


def test_cli_runs_the_real_tiny_geopixel(rrsis_with_images: Path, tmp_path: Path) -> None:
    gt = json.loads(rrsis_with_images.read_text())
    gt["samples"] = gt["samples"][:2]
    rrsis_with_images.write_text(json.dumps(gt))
    saved, report = tmp_path / "pred.json", tmp_path / "report.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--task",
            "rrsis",
            "--data",
            str(rrsis_with_images),
            "--model",
            str(TINY),
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--hd-num",
            "1",
            "--max-new-tokens",
            "4",
            "--batch-size",
            "2",
            "--save-predictions",
            str(saved),
            "--report",
            str(report),
        ],
    )
    assert result.exit_code == 0, result.output
    preds = json.loads(saved.read_text())["predictions"]
    assert [p["sample_id"] for p in preds] == ["r01", "r02"]
    assert all(p["mask"]["size"] == [200, 200] for p in preds)
    got = json.loads(report.read_text())
    assert got["num_samples"] == 2
    rescored = run_eval("rrsis", rrsis_with_images, predictions=saved)
    assert rescored["per_sample_iou"] == got["per_sample_iou"]


def test_cli_missing_model_is_one_line(rrsis_with_images: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["eval", "--task", "rrsis", "--data", str(rrsis_with_images), "--model", str(tmp_path / "nope")],
    )
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "not found" in lines[0], lines
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def test_save_predictions_clash_refused_before_the_model_runs(
    gcg_with_images: Path, rrsis_with_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from geopixel_cli import loader
    from geopixel_cli.eval.errors import EvalError

    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    model = OracleModel(rrsis=load_rrsis_ground_truth(rrsis_with_images))
    with pytest.raises(EvalError, match="taken.json exists"):
        run_eval("rrsis", rrsis_with_images, model=model, save_predictions=taken)
    assert model.calls == []
    folder = tmp_path / "gcg_preds"
    folder.mkdir()
    (folder / "P0104_0_200_0_200.json").write_text("{}")
    model = OracleModel(gcg=load_gcg_ground_truth(gcg_with_images))
    with pytest.raises(EvalError, match="P0104_0_200_0_200.json exists"):
        run_eval("gcg", gcg_with_images, model=model, text_model="iou-only", save_predictions=folder)
    assert model.calls == []

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the destination was checked")

    monkeypatch.setattr(loader, "load_model", no_load)
    with pytest.raises(EvalError, match="taken.json exists"):
        run_eval("rrsis", rrsis_with_images, model=str(TINY), save_predictions=taken)
