"""RS-GCG metrics: AP50 (pycocotools), mIoU and Recall (GLaMM's greedy matchings), and the report.

Every quirk listed in EVALUATION.md 1.5-1.7 is kept on purpose: AP50 depends on the emission
order of equal-score masks; mIoU ignores unmatched masks; Recall stops at the first max-IoU pair
that fails either threshold, and an image whose matching reaches a mask without a phrase scores
0 true positives (GLaMM swallows that IndexError) while its GT phrases still count.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from geopixel_cli.eval.gcg_data import GcgImage, GcgPrediction
from geopixel_cli.eval.rle import decode_masks, iou_matrix

SimilarityFn = Callable[[list[str], list[str]], np.ndarray]
SPLITS = ("overall", "uni_target", "multi_target")
IOU_ONLY = "iou_only"


@dataclass
class ImageScores:
    """Mask metrics of one image.

    Attributes:
        miou: GLaMM's per-image greedy-paired mean IoU (0.0 when nothing overlaps).
        gt_phrases: Number of GT phrases (Recall's denominator).
        true_positives: Recall variant name -> matched GT phrases.
    """

    miou: float
    gt_phrases: int
    true_positives: dict[str, int]


def iou_only_similarity(gt_labels: list[str], phrases: list[str]) -> np.ndarray:
    """Similarity that always passes (the IoU-only Recall variant).

    Args:
        gt_labels: GT phrases.
        phrases: Predicted phrases.

    Returns:
        (len(gt_labels), len(phrases)) ones.
    """
    return np.ones((len(gt_labels), len(phrases)), np.float64)


def greedy_miou(ious: np.ndarray) -> float:
    """GLaMM's ``compute_miou`` on a prediction x GT IoU matrix.

    Args:
        ious: (P, G) pixel IoU.

    Returns:
        Mean of the IoUs picked by repeated arg-max with row/column removal while > 0; 0.0 if none.
    """
    paired: list[float] = []
    m = ious.copy()
    while m.size > 0 and np.max(m) > 0:
        r, c = np.unravel_index(np.argmax(m, axis=None), m.shape)
        paired.append(float(m[r, c]))
        m = np.delete(np.delete(m, r, axis=0), c, axis=1)
    return float(np.mean(paired)) if paired else 0.0


def greedy_recall_matches(
    ious: np.ndarray, sims: np.ndarray, *, iou_thr: float = 0.5, sim_thr: float = 0.5
) -> int:
    """GLaMM's ``find_best_matches`` + its caller's error handling: true positives of one image.

    Args:
        ious: (G, P) GT x prediction IoU.
        sims: (G, len(phrases)) GT label x predicted phrase similarity; may have fewer columns
            than ``ious`` (masks without phrases).
        iou_thr: Inclusive IoU threshold.
        sim_thr: Inclusive similarity threshold.

    Returns:
        Number of matched pairs; 0 when the loop indexes a phrase that does not exist.
    """
    ious, sims = ious.copy(), sims.astype(np.float64).copy()
    matched = 0
    while ious.size > 0:
        r, c = np.unravel_index(np.argmax(ious), ious.shape)
        if ious[r, c] < iou_thr:
            break
        if r >= sims.shape[0] or c >= sims.shape[1]:
            return 0  # the reference raises IndexError here, prints it and counts no TP for the image
        if sims[r, c] < sim_thr:
            break
        matched += 1
        ious[r, :] = 0
        ious[:, c] = 0
        sims[r, :] = 0
        sims[:, c] = 0
    return matched


def score_image(gt: GcgImage, pred: GcgPrediction, similarities: dict[str, SimilarityFn]) -> ImageScores:
    """Per-image mIoU and Recall counts.

    Args:
        gt: Ground truth.
        pred: Prediction (masks already validated at the GT size).
        similarities: Recall variant name -> text similarity function.

    Returns:
        The image's scores.
    """
    size = (gt.height, gt.width)
    pred_masks = decode_masks(pred.masks, size)  # (P, H, W)
    gt_masks = decode_masks(gt.masks, size)  # (G, H, W)
    ious = iou_matrix(pred_masks, gt_masks)  # (P, G)
    tps: dict[str, int] = {}
    for name, fn in similarities.items():
        sims = np.asarray(fn(gt.labels, pred.phrases), np.float64).reshape(len(gt.labels), len(pred.phrases))
        tps[name] = greedy_recall_matches(ious.T, sims)
    return ImageScores(miou=greedy_miou(ious), gt_phrases=len(gt.labels), true_positives=tps)


def coco_segm_stats(
    images: list[GcgImage], preds: dict[str, GcgPrediction], splits: dict[str, list[str]]
) -> dict[str, list[float]]:
    """COCOeval ``segm`` summary (12 numbers; ``[1]`` = AP50) per split, as GLaMM runs it.

    Every predicted mask is a category-1 detection with score 1.0, listed image by image in GT
    order and, within an image, in emission order. A split restricts ``params.imgIds``.

    Args:
        images: Ground truth.
        preds: Predictions of every GT image.
        splits: Split name -> image ids.

    Returns:
        Split name -> the 12 stats; all zeros when no image has a predicted mask (pycocotools
        cannot load an empty result list).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dets = [
        {"image_id": im.image_id, "category_id": 1, "segmentation": dict(m), "score": 1.0}
        for im in images
        for m in preds[im.image_id].masks
    ]
    if not dets:
        return {name: [0.0] * 12 for name in splits}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = _coco_gt_dataset(images)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        out: dict[str, list[float]] = {}
        for name, ids in splits.items():
            ev = COCOeval(coco_gt, coco_dt, "segm")
            ev.params.catIds = [1]
            ev.params.imgIds = list(ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            out[name] = [float(v) for v in ev.stats]
    return out


def _coco_gt_dataset(images: list[GcgImage]) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    anns: list[dict[str, Any]] = []
    given_ids = [a["id"] for im in images for a in im.anns if isinstance(a.get("id"), int)]
    next_id = 1 + max(given_ids, default=0)
    for im in images:
        for i, rle in enumerate(im.masks):
            given = im.anns[i] if i < len(im.anns) else {}
            coco = {"size": rle["size"], "counts": rle["counts"].encode()}
            ann_id = given.get("id")
            if not isinstance(ann_id, int):
                ann_id, next_id = next_id, next_id + 1
            anns.append(
                {
                    "id": ann_id,
                    "image_id": im.image_id,
                    "category_id": 1,
                    "iscrowd": int(given.get("iscrowd", 0)),
                    "segmentation": dict(rle),
                    "area": float(given.get("area", mask_utils.area(coco))),
                    "bbox": given.get("bbox") or [float(v) for v in mask_utils.toBbox(coco)],
                }
            )
    imgs = [{"id": im.image_id, "height": im.height, "width": im.width} for im in images]
    return {"images": imgs, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}


def evaluate_gcg(
    images: list[GcgImage],
    preds: dict[str, GcgPrediction],
    *,
    splits: dict[str, list[str]],
    similarities: dict[str, SimilarityFn],
    caption_by_split: bool = True,
) -> dict[str, Any]:
    """All RS-GCG numbers, nested like ``shared/golden/eval/gcg/expected.json``.

    Args:
        images: Ground truth in scoring order.
        preds: A validated prediction for every GT image.
        splits: ``overall`` / ``uni_target`` / ``multi_target`` -> image ids.
        similarities: Recall variant name (e.g. ``minilm_meanpool``, ``iou_only``) -> similarity.
        caption_by_split: Also score CIDEr/METEOR with each split as its own corpus.

    Returns:
        ``{"caption", "caption_by_split", "splits", "per_image"}`` (fractions; CIDEr x10 scale).
    """
    from geopixel_cli.eval.captions import score_captions

    by_id = {im.image_id: im for im in images}
    per_image = {im.image_id: score_image(im, preds[im.image_id], similarities) for im in images}
    stats = coco_segm_stats(images, preds, {k: v for k, v in splits.items() if v})

    def caption_scores(ids: list[str]) -> Any:
        return score_captions({i: by_id[i].caption for i in ids}, {i: preds[i].caption for i in ids})

    overall_caps = caption_scores(splits["overall"])
    report: dict[str, Any] = {
        "caption": {
            "CIDEr": overall_caps.cider,
            "METEOR": overall_caps.meteor,
            "other_scores_printed_by_reference": overall_caps.other,
        },
        "caption_by_split": {},
        "splits": {},
        "per_image": {},
    }
    for name, ids in splits.items():
        if caption_by_split:
            caps = overall_caps if name == "overall" else (caption_scores(ids) if ids else None)
            report["caption_by_split"][name] = (
                {"CIDEr": caps.cider, "METEOR": caps.meteor} if caps else {"CIDEr": None, "METEOR": None}
            )
        report["splits"][name] = _split_block(ids, per_image, stats.get(name, [-1.0] * 12), similarities)
    for image_id, s in per_image.items():
        row: dict[str, Any] = {"mIoU": s.miou}
        row.update({f"tp_{k}": v for k, v in s.true_positives.items()})
        row.update(
            {
                "gt_phrases": s.gt_phrases,
                "CIDEr": overall_caps.per_image_cider[image_id],
                "METEOR": overall_caps.per_image_meteor[image_id],
            }
        )
        report["per_image"][image_id] = row
    return report


def _split_block(
    ids: list[str],
    per_image: dict[str, ImageScores],
    stats: list[float],
    similarities: dict[str, SimilarityFn],
) -> dict[str, Any]:
    gt_total = sum(per_image[i].gt_phrases for i in ids)
    recall: dict[str, Any] = {}
    for name in similarities:
        tp = sum(per_image[i].true_positives[name] for i in ids)
        recall[name] = {
            "recall": tp / gt_total if gt_total > 0 else 0.0,
            "true_positives": tp,
            "gt_phrases": gt_total,
        }
    mious = [per_image[i].miou for i in ids]
    return {
        "image_ids": list(ids),
        "num_images": len(ids),
        "AP50": stats[1],
        "coco_segm_stats": stats,
        "mIoU": float(np.mean(mious)) if mious else 0.0,
        "recall": recall,
    }
