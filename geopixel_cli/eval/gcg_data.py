"""RS-GCG ground truth and predictions: readers, validation and the Uni/Multi-Target split.

Ground truth comes in two layouts:

* GLaMM's evaluation files (the layout of ``shared/golden/eval/gcg``): a folder holding
  ``<split>_gcg_coco_mask_gt.json`` (COCO instances, compressed RLE) and
  ``<split>_gcg_coco_caption_gt.json`` (one caption + ``labels`` per image).
* A native GeoPixelD test folder (``<patch>.json`` + ``<patch>.png``, or the dataset root with a
  ``test/`` folder), converted as EVALUATION.md 1.2 says: labels = the ``<p>`` spans, caption =
  the description without tags, one mask per phrase = pycocotools' polygon fill merged into one RLE.

Predictions are GLaMM's per-image records ``{image_id, caption, phrases, pred_masks}``: a folder
of ``<image_id>.json`` files or one JSON file holding a list of such records.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geopixel_cli.eval.errors import EvalError
from geopixel_cli.eval.rle import Rle, check_rle

PHRASE_RE = re.compile(r"<p>(.*?)</p>")  # a grounded phrase; also used by geopixeld.py


@dataclass
class GcgImage:
    """Ground truth of one image.

    Attributes:
        image_id: The image id (string, e.g. ``P0003_0_800_347_1147``).
        height: Image height in pixels.
        width: Image width in pixels.
        caption: The clean GT description.
        labels: GT phrases, index-aligned with ``masks``.
        masks: One compressed RLE per phrase, in phrase order.
        anns: The COCO annotation dicts of the masks (ids, area, bbox kept as given).
        image_path: The image file, when known (needed only to run a model).
    """

    image_id: str
    height: int
    width: int
    caption: str
    labels: list[str]
    masks: list[Rle]
    anns: list[dict[str, Any]] = field(default_factory=list)
    image_path: Path | None = None


@dataclass
class GcgPrediction:
    """A model's answer for one image (GLaMM's inference record).

    Attributes:
        image_id: The image id.
        caption: The cleaned caption.
        phrases: Every ``<p>...</p>`` span, in order; phrase j goes with mask j.
        masks: Compressed RLEs at the image's size, in emission order.
    """

    image_id: str
    caption: str
    phrases: list[str]
    masks: list[Rle]

    def to_json(self) -> dict[str, Any]:
        """The record as GLaMM's ``infer.py`` writes it."""
        return {
            "image_id": self.image_id,
            "caption": self.caption,
            "phrases": self.phrases,
            "pred_masks": self.masks,
        }


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EvalError(f"{path}: cannot read JSON ({exc})") from exc


def find_coco_pair(folder: Path) -> tuple[Path, Path] | None:
    """Find GLaMM's ``*_gcg_coco_mask_gt.json`` / ``*_gcg_coco_caption_gt.json`` pair in a folder.

    Args:
        folder: Folder to look in.

    Returns:
        (mask file, caption file), preferring the ``test_`` pair; None when there is none.
    """
    masks = sorted(folder.glob("*gcg_coco_mask_gt.json"))
    pairs = [(m, m.with_name(m.name.replace("mask_gt", "caption_gt"))) for m in masks]
    pairs = [p for p in pairs if p[1].is_file()]
    if not pairs:
        return None
    test = [p for p in pairs if p[0].name.startswith("test")]
    if len(pairs) > 1 and len(test) != 1:
        raise EvalError(f"{folder}: several GCG ground-truth pairs, keep one: {[p[0].name for p in pairs]}")
    return test[0] if len(pairs) > 1 else pairs[0]


def load_gcg_ground_truth(path: Path) -> list[GcgImage]:
    """Read GCG ground truth from GLaMM's COCO pair or a GeoPixelD test folder.

    Args:
        path: The folder holding the COCO pair, a GeoPixelD ``test`` folder, or the GeoPixelD root.

    Returns:
        One record per image, in the caption file's image order (GeoPixelD: sorted by name).
    """
    if not path.is_dir():
        raise EvalError(f"{path}: --data for gcg must be a folder")
    pair = find_coco_pair(path)
    if pair is not None:
        return read_coco_pair(*pair)
    folder = path / "test" if (path / "test").is_dir() else path
    if any(folder.glob("*.json")):
        from geopixel_cli.eval.geopixeld import read_geopixeld_folder

        return read_geopixeld_folder(folder)
    raise EvalError(f"{path}: neither GLaMM's *_gcg_coco_*_gt.json pair nor GeoPixelD <patch>.json files")


def read_coco_pair(mask_file: Path, caption_file: Path) -> list[GcgImage]:
    """Read GLaMM's two COCO ground-truth files and check that they agree.

    Args:
        mask_file: COCO instance file (one RLE annotation per phrase).
        caption_file: COCO caption file (one ``caption`` + ``labels`` per image).

    Returns:
        One record per image, in the caption file's image order.
    """
    masks_js, caps_js = _read_json(mask_file), _read_json(caption_file)
    sizes = {str(im["id"]): (int(im["height"]), int(im["width"])) for im in masks_js.get("images", [])}
    folder = mask_file.parent
    anns_by_image: dict[str, list[dict[str, Any]]] = {}
    for ann in masks_js.get("annotations", []):
        anns_by_image.setdefault(str(ann["image_id"]), []).append(ann)
    caps: dict[str, dict[str, Any]] = {}
    for ann in caps_js.get("annotations", []):
        image_id = str(ann["image_id"])
        if image_id in caps:
            raise EvalError(f"{caption_file.name}: image {image_id} has more than one caption annotation")
        caps[image_id] = ann
    images: list[GcgImage] = []
    for im in caps_js.get("images", []):
        image_id = str(im["id"])
        if image_id not in sizes:
            raise EvalError(f"{mask_file.name}: image {image_id} of {caption_file.name} is missing")
        if image_id not in caps:
            raise EvalError(f"{caption_file.name}: image {image_id} has no caption annotation")
        record = _gt_record(image_id, sizes[image_id], caps[image_id], anns_by_image.get(image_id, []))
        record.image_path = _find_image(folder, str(im.get("file_name") or f"{image_id}.png"))
        images.append(record)
    if not images:
        raise EvalError(f"{caption_file.name}: no images")
    extra = set(sizes) - {im.image_id for im in images}
    if extra:
        raise EvalError(f"{mask_file.name}: images not in {caption_file.name}: {sorted(extra)[:5]}")
    return images


def _find_image(folder: Path, file_name: str) -> Path | None:
    for base in (folder, folder / "images", folder.parent / "images"):
        if (base / file_name).is_file():
            return base / file_name
    return None


def _gt_record(
    image_id: str, size: tuple[int, int], cap: dict[str, Any], anns: list[dict[str, Any]]
) -> GcgImage:
    labels = cap.get("labels")
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise EvalError(f"GT image {image_id}: caption annotation needs a 'labels' list of strings")
    if len(labels) != len(anns):
        raise EvalError(f"GT image {image_id}: {len(labels)} labels but {len(anns)} mask annotations")
    masks = [
        check_rle(a.get("segmentation"), where=f"GT image {image_id} mask {i}", size=size)
        for i, a in enumerate(anns)
    ]
    return GcgImage(image_id, size[0], size[1], str(cap.get("caption", "")), list(labels), masks, anns)


def load_gcg_predictions(path: Path, images: list[GcgImage]) -> tuple[dict[str, GcgPrediction], list[str]]:
    """Read and validate the predictions for every GT image.

    Args:
        path: A folder of ``<image_id>.json`` records, or one JSON file with a list of records.
        images: The ground truth (gives the ids and mask sizes).

    Returns:
        (image id -> prediction, ids of predictions that have no GT image and were ignored).

    Raises:
        EvalError: A GT image without a prediction, a record whose id does not match its file,
            or a malformed record.
    """
    raw: dict[str, tuple[str, Any]] = {}
    extra: list[str] = []
    gt_ids = {im.image_id for im in images}
    if path.is_dir():
        for im in images:
            file = path / f"{im.image_id}.json"
            if file.is_file():
                raw[im.image_id] = (file.name, _read_json(file))
        extra = sorted(p.stem for p in path.glob("*.json") if p.stem not in gt_ids)
    elif path.is_file():
        records = _read_json(path)
        if isinstance(records, dict):
            records = records.get("predictions", records)
        if not isinstance(records, list):
            raise EvalError(f"{path}: expected a list of prediction records")
        for n, rec in enumerate(records):
            rec_id = str(_unwrap(rec, f"{path.name} record {n}").get("image_id"))
            if rec_id in raw or rec_id in extra:
                raise EvalError(f"{path.name}: two predictions for image {rec_id}")
            if rec_id in gt_ids:
                raw[rec_id] = (f"{path.name} record {n}", rec)
            else:
                extra.append(rec_id)
    else:
        raise EvalError(f"{path}: predictions not found")
    preds: dict[str, GcgPrediction] = {}
    for im in images:
        if im.image_id not in raw:
            raise EvalError(
                f"image {im.image_id}: no prediction in {path} (every GT image needs one; "
                "an image where the model grounded nothing gets empty lists)"
            )
        where, rec = raw[im.image_id]
        preds[im.image_id] = parse_prediction(rec, im, where=where)
    return preds, extra


def _unwrap(rec: Any, where: str) -> dict[str, Any]:
    """GLaMM also accepts ``{key: record}``; return the record itself."""
    if isinstance(rec, dict) and "caption" not in rec and len(rec) == 1:
        inner = next(iter(rec.values()))
        if isinstance(inner, dict):
            return inner
    if not isinstance(rec, dict):
        raise EvalError(f"{where}: a prediction record must be a JSON object")
    return rec


def parse_prediction(rec: Any, image: GcgImage, *, where: str) -> GcgPrediction:
    """Validate one prediction record against its GT image.

    Args:
        rec: The JSON record.
        image: Its GT image.
        where: Name of the record for messages.

    Returns:
        The parsed prediction.
    """
    rec = _unwrap(rec, where)
    rec_id = str(rec.get("image_id", image.image_id))
    if rec_id != image.image_id:
        raise EvalError(f"{where}: image_id {rec_id!r} does not match the GT image {image.image_id!r}")
    caption, phrases, masks = rec.get("caption"), rec.get("phrases", []), rec.get("pred_masks", [])
    if not isinstance(caption, str):
        raise EvalError(f"{where}: 'caption' must be a string")
    if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
        raise EvalError(f"{where}: 'phrases' must be a list of strings")
    if not isinstance(masks, list):
        raise EvalError(f"{where}: 'pred_masks' must be a list of RLEs")
    size = (image.height, image.width)
    rles = [
        check_rle(m, where=f"{where} (image {image.image_id}) pred_masks[{i}]", size=size)
        for i, m in enumerate(masks)
    ]
    return GcgPrediction(image.image_id, caption, list(phrases), rles)


def resolve_splits(images: list[GcgImage], split_file: Path | None) -> tuple[dict[str, list[str]], str]:
    """Image ids of the Overall, Uni-Target and Multi-Target sets.

    Args:
        images: The ground truth, in scoring order.
        split_file: Optional JSON with ``uni_target`` / ``multi_target`` id lists.

    Returns:
        ({"overall", "uni_target", "multi_target"} -> ids in GT order, a description of the rule).
    """
    order = [im.image_id for im in images]
    if split_file is not None:
        js = _read_json(split_file)
        known = set(order)
        out = {"overall": order}
        for name in ("uni_target", "multi_target"):
            ids = js.get(name)
            if not isinstance(ids, list):
                raise EvalError(f"{split_file}: needs a '{name}' list of image ids")
            unknown = [i for i in map(str, ids) if i not in known]
            if unknown:
                raise EvalError(f"{split_file}: {name} lists ids that are not GT images: {unknown[:5]}")
            chosen = set(map(str, ids))
            out[name] = [i for i in order if i in chosen]
        return out, f"split file {split_file}"
    uni = [im.image_id for im in images if len(im.labels) == 1]
    multi = [im.image_id for im in images if len(im.labels) >= 2]
    rule = "one GT phrase = uni-target (inferred rule)"
    return {"overall": order, "uni_target": uni, "multi_target": multi}, rule


def phrases_from_text(text: str) -> list[str]:
    """Every non-greedy ``<p>...</p>`` span, stripped (GLaMM ``infer.py``).

    Args:
        text: Raw model response.

    Returns:
        The phrases in order, including phrases not followed by ``[SEG]``.
    """
    return [p.strip() for p in PHRASE_RE.findall(_flatten(text))]


def _flatten(text: str) -> str:
    return text.replace("[UNUSED_TOKEN_145]", "").replace("\n", "").replace("  ", " ")


def caption_from_text(text: str) -> str:
    """Clean a raw response into the caption GLaMM's ``infer.py`` saves.

    Args:
        text: Raw model response (``[UNUSED_TOKEN_145]`` already removed).

    Returns:
        Newlines dropped, tags and ``[SEG]`` removed, whitespace collapsed, quotes stripped.
    """
    cleaned = re.sub(r"<.*?>", "", _flatten(text)).replace("[SEG]", "")
    return " ".join(cleaned.split()).strip("'").strip()
