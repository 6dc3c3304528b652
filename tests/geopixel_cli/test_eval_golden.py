"""End-to-end ``geopixel eval`` on ../shared/golden/eval: every recorded number, API and CLI.

The caption scorers run the Java jars that pycocoevalcap ships (PTB tokenizer, METEOR 1.5), so
Java must be on PATH. METEOR's JVM is started once per test process and reused by every test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from geopixel_cli.cli import app
from geopixel_cli.eval.api import run_eval
from geopixel_cli.eval.captions import java_available

GOLDEN = Path(__file__).resolve().parents[2].parent / "shared" / "golden" / "eval"
METEOR_TOL = 1e-6  # golden README: Java float formatting
EXACT = 1e-9


@pytest.fixture(scope="module", autouse=True)
def _prerequisites() -> None:
    if not (GOLDEN / "gcg" / "expected.json").is_file():
        pytest.fail(f"golden eval fixtures not found at {GOLDEN} (check out ../shared)", pytrace=False)
    if not java_available():
        pytest.fail("java is not on PATH: the PTB tokenizer and METEOR jars need it", pytrace=False)


def _golden_similarity():
    sims = json.loads((GOLDEN / "gcg" / "text_similarity_minilm.json").read_text())["images"]

    def fn(labels: list[str], phrases: list[str]) -> np.ndarray:
        for rec in sims.values():
            if rec["gt_labels"] == labels and rec["pred_phrases"] == phrases:
                return np.asarray(rec["cosine"], np.float64).reshape(len(labels), len(phrases))
        raise AssertionError(f"no golden similarity for {labels} x {phrases}")

    return fn


def assert_matches(got, want, path: str = "") -> int:
    """Compare every leaf of ``want`` (minus ``meta``); returns the number of leaves checked."""
    if isinstance(want, dict):
        n = 0
        for key, value in want.items():
            if key in ("meta", "reference_printout"):
                continue
            assert key in got, f"missing {path}.{key}"
            n += assert_matches(got[key], value, f"{path}.{key}")
        return n
    if isinstance(want, list):
        assert len(got) == len(want), path
        return sum(
            assert_matches(g, w, f"{path}[{i}]") for i, (g, w) in enumerate(zip(got, want, strict=True))
        )
    if isinstance(want, float):
        tol = METEOR_TOL if "METEOR" in path else EXACT
        assert got == pytest.approx(want, abs=tol), path
        return 1
    assert got == want, path
    return 1


@pytest.fixture(scope="module")
def gcg_report() -> dict:
    return run_eval(
        "gcg",
        GOLDEN / "gcg",
        predictions=GOLDEN / "gcg" / "predictions",
        similarity=_golden_similarity(),
        similarity_variant="minilm_meanpool",
    )


def test_gcg_api_matches_every_golden_number(gcg_report: dict) -> None:
    expected = json.loads((GOLDEN / "gcg" / "expected.json").read_text())
    checked = assert_matches(gcg_report, expected)
    assert checked >= 140  # caption, caption_by_split, 3 splits x (ids, stats, AP50, mIoU, recall), per image
    assert gcg_report["splits"]["overall"]["AP50"] == pytest.approx(0.6673098079038673, abs=EXACT)
    assert gcg_report["caption"]["CIDEr"] == pytest.approx(3.055978246064373, abs=EXACT)


def test_gcg_cli_with_packaged_minilm(tmp_path: Path) -> None:
    """The CLI computes the MiniLM similarities itself and reproduces the golden Recall counts."""
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--task",
            "gcg",
            "--data",
            str(GOLDEN / "gcg"),
            "--predictions",
            str(GOLDEN / "gcg" / "predictions"),
            "--text-model",
            "minilm",
            "--report",
            str(report),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "all-MiniLM-L6-v2" in result.stderr and "not the reference bert-base-uncased" in result.stderr
    assert "Overall" in result.stderr and "66.7" in result.stderr  # the table: AP50 x100
    got = json.loads(report.read_text())
    assert_matches(got, json.loads((GOLDEN / "gcg" / "expected.json").read_text()))
    assert got["meta"]["recall_variants"] == ["minilm_meanpool", "iou_only"]


def test_rrsis_cli(tmp_path: Path) -> None:
    report = tmp_path / "rrsis.json"
    args = [
        "eval",
        "--task",
        "rrsis",
        "--data",
        str(GOLDEN / "rrsis" / "gt.json"),
        "--predictions",
        str(GOLDEN / "rrsis" / "predictions.json"),
        "--report",
        str(report),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "75.00" in result.stderr and "58.86" in result.stderr  # RMSIN's own printout digits
    assert_matches(
        json.loads(report.read_text()), json.loads((GOLDEN / "rrsis" / "expected.json").read_text())
    )
    again = CliRunner().invoke(app, args)  # an existing report is not clobbered
    assert again.exit_code == 1 and "exists (use --overwrite)" in again.stderr


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    data = tmp_path / "gcg"
    shutil.copytree(GOLDEN / "gcg", data)
    (data / "predictions" / "P0106_0_200_0_200.json").write_text(
        json.dumps(
            {
                "image_id": "P0106_0_200_0_200",
                "caption": "x",
                "phrases": [],
                "pred_masks": [{"size": [200, 200], "counts": "not an rle"}],
            }
        )
    )
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--task",
            "gcg",
            "--data",
            str(data),
            "--predictions",
            str(data / "predictions"),
            "--text-model",
            "iou-only",
        ],
    )
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: P0106_0_200_0_200.json (image P0106_0_200_0_200) pred_masks[0]")
    assert "Traceback" not in result.stderr
    both = CliRunner().invoke(
        app,
        [
            "eval",
            "--task",
            "rrsis",
            "--data",
            str(GOLDEN / "rrsis" / "gt.json"),
            "--predictions",
            str(GOLDEN / "rrsis" / "predictions.json"),
            "--model",
            "some/model",
        ],
    )
    assert both.exit_code == 1 and "exactly one of --predictions" in both.stderr
