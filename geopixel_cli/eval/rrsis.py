"""RRSIS metrics (P@0.5-0.9, oIoU, mIoU) as RMSIN/LAVT ``test.py`` computes them, and their inputs.

One sample = one referring sentence. Per sample I = |pred AND gt|, U = |pred OR gt|, IoU = I/U
and 0 when U = 0. mIoU is the mean per-sample IoU, oIoU = sum(I) / sum(U), P@X the fraction of
samples with IoU >= X. The main numbers use native-resolution masks; the report also gives RMSIN's
own setting (both masks resized to 480x480 with PIL nearest-neighbour) as a variant.

Ground truth: the layout of ``shared/golden/eval/rrsis/gt.json`` or a native RRSIS-D folder
(``rrsisd/refs(unc).p`` + ``rrsisd/instances.json``), read in :mod:`geopixel_cli.eval.rrsisd`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geopixel_cli.eval.errors import EvalError
from geopixel_cli.eval.rle import Rle, check_rle, decode_masks

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
RESIZE_VARIANT = "rmsin_resize_480_nearest"


@dataclass
class RrsisSample:
    """One referring sentence with its GT mask.

    Attributes:
        sample_id: Unique id of the sentence.
        ref_id: Id of the referred object (several sentences may share it).
        image_id: Image id.
        sentence: The referring expression.
        height: Mask height.
        width: Mask width.
        mask: Compressed RLE of the GT mask.
        image_path: Image file for the model mode, when known.
    """

    sample_id: str
    ref_id: str
    image_id: str
    sentence: str
    height: int
    width: int
    mask: Rle
    image_path: Path | None = None


def load_rrsis_ground_truth(path: Path, *, split: str = "test") -> list[RrsisSample]:
    """Read RRSIS ground truth from a ``gt.json`` file or a native RRSIS-D folder.

    Args:
        path: ``gt.json`` (golden layout) or the RRSIS-D root folder.
        split: RRSIS-D split to read (``train`` / ``val`` / ``test``); ignored for ``gt.json``.

    Returns:
        The samples in file order.
    """
    if path.is_dir():
        if (path / "gt.json").is_file():
            return read_gt_json(path / "gt.json")
        from geopixel_cli.eval.rrsisd import read_rrsisd

        return read_rrsisd(path, split=split)
    if path.is_file():
        return read_gt_json(path)
    raise EvalError(f"{path}: RRSIS ground truth not found")


def read_gt_json(path: Path) -> list[RrsisSample]:
    """Read ``{samples: [{sample_id, ref_id, image_id, sentence, height, width, mask}]}``.

    Args:
        path: The JSON file.

    Returns:
        The samples.
    """
    js = _read_json(path)
    records = js.get("samples") if isinstance(js, dict) else js
    if not isinstance(records, list):
        raise EvalError(f"{path}: expected {{'samples': [...]}}")
    samples: list[RrsisSample] = []
    seen: set[str] = set()
    for n, rec in enumerate(records):
        sid = str(rec.get("sample_id", n)) if isinstance(rec, dict) else None
        if sid is None:
            raise EvalError(f"{path.name} record {n}: not a JSON object")
        if sid in seen:
            raise EvalError(f"{path.name}: duplicate sample_id {sid}")
        seen.add(sid)
        mask = check_rle(rec.get("mask"), where=f"{path.name} sample {sid}")
        h, w = mask["size"]
        if (rec.get("height", h), rec.get("width", w)) != (h, w):
            raise EvalError(f"{path.name} sample {sid}: mask size {h}x{w} differs from height/width")
        image = rec.get("file_name") or rec.get("image")
        samples.append(
            RrsisSample(
                sid,
                str(rec.get("ref_id", sid)),
                str(rec.get("image_id", "")),
                str(rec.get("sentence", "")),
                h,
                w,
                mask,
                (path.parent / image) if image else None,
            )
        )
    return samples


def load_rrsis_predictions(path: Path, samples: list[RrsisSample]) -> tuple[dict[str, Rle], list[str]]:
    """Read ``{predictions: [{sample_id, mask}]}`` and check it against the samples.

    Args:
        path: The predictions JSON file.
        samples: The ground truth.

    Returns:
        (sample id -> mask RLE at the GT size, ids of predictions without a GT sample).
    """
    js = _read_json(path)
    records = js.get("predictions") if isinstance(js, dict) else js
    if not isinstance(records, list):
        raise EvalError(f"{path}: expected {{'predictions': [...]}}")
    sizes = {s.sample_id: (s.height, s.width) for s in samples}
    out: dict[str, Rle] = {}
    extra: list[str] = []
    for n, rec in enumerate(records):
        if not isinstance(rec, dict) or "sample_id" not in rec:
            raise EvalError(f"{path.name} record {n}: needs 'sample_id' and 'mask'")
        sid = str(rec["sample_id"])
        if sid in out or sid in extra:
            raise EvalError(f"{path.name}: two predictions for sample {sid}")
        if sid not in sizes:
            extra.append(sid)
            continue
        out[sid] = check_rle(rec.get("mask"), where=f"{path.name} sample {sid}", size=sizes[sid])
    missing = [s.sample_id for s in samples if s.sample_id not in out]
    if missing:
        raise EvalError(
            f"sample {missing[0]}: no prediction in {path} ({len(missing)} samples missing; "
            "a model answer without [SEG] is an empty mask, not a missing record)"
        )
    return out, extra


def evaluate_rrsis(samples: list[RrsisSample], preds: dict[str, Rle]) -> dict[str, Any]:
    """All RRSIS numbers, nested like ``shared/golden/eval/rrsis/expected.json``.

    Args:
        samples: Ground truth.
        preds: Sample id -> predicted mask at the GT size.

    Returns:
        ``P@0.5`` ... ``P@0.9``, ``oIoU``, ``mIoU``, ``cum_I``, ``cum_U``, ``num_samples``,
        ``per_sample_iou`` and ``variants.rmsin_resize_480_nearest``.
    """
    native: list[tuple[int, int]] = []
    resized: list[tuple[int, int]] = []
    for s in samples:
        gt = decode_masks([s.mask], (s.height, s.width))[0]  # (H, W)
        pred = decode_masks([preds[s.sample_id]], (s.height, s.width))[0]  # (H, W)
        native.append(_inter_union(pred, gt))
        resized.append(_inter_union(_resize_nearest(pred), _resize_nearest(gt)))
    ids = [s.sample_id for s in samples]
    report = accumulate(ids, native)
    report["variants"] = {RESIZE_VARIANT: accumulate(ids, resized)}
    return report


def _inter_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    return int(np.sum(np.logical_and(pred, gt))), int(np.sum(np.logical_or(pred, gt)))


def _resize_nearest(mask: np.ndarray, size: int = 480) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST))


def accumulate(ids: list[str], inter_union: list[tuple[int, int]]) -> dict[str, Any]:
    """RMSIN's ``evaluate`` accumulation over per-sample (I, U) counts.

    Args:
        ids: Sample ids.
        inter_union: (I, U) pixel counts per sample.

    Returns:
        The metric dict (fractions).
    """
    ious = [0.0 if u == 0 else i * 1.0 / u for i, u in inter_union]
    cum_i = sum(i for i, _ in inter_union)
    cum_u = sum(u for _, u in inter_union)
    n = len(ious)
    out: dict[str, Any] = {
        "mIoU": float(np.mean(np.array(ious))) if n else 0.0,
        "oIoU": cum_i / cum_u if cum_u else 0.0,
        "cum_I": cum_i,
        "cum_U": cum_u,
        "num_samples": n,
    }
    for t in THRESHOLDS:
        out[f"P@{t}"] = sum(1 for v in ious if v >= t) / n if n else 0.0
    out["per_sample_iou"] = dict(zip(ids, ious, strict=True))
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EvalError(f"{path}: cannot read JSON ({exc})") from exc
