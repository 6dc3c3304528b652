"""Native GeoPixelD test folder -> GCG ground truth (EVALUATION.md 1.2).

Each ``<patch>.json`` holds ``gcg_description`` (phrases as ``<p> ... </p> [SEG]``) and
``polygons`` (one list of ``[x, y]`` polygons per ``[SEG]``). The GT mask of a phrase is the
union of its polygons rasterised by pycocotools and merged into one RLE, which is what the
``polygons_to_rle`` helper next to GeoPixel's evaluation helpers does; the training loader's
OpenCV fill differs from it by a pixel at boundaries.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from geopixel_cli.eval.errors import EvalError
from geopixel_cli.eval.gcg_data import PHRASE_RE, GcgImage
from geopixel_cli.eval.rle import Rle

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def read_geopixeld_folder(folder: Path) -> list[GcgImage]:
    """Read every ``<patch>.json`` of a GeoPixelD folder as GCG ground truth.

    Args:
        folder: A folder such as ``GeoPixelD/test`` holding ``<patch>.json`` and ``<patch>.png``.

    Returns:
        One record per annotation file, sorted by patch name.
    """
    files = sorted(p for p in folder.glob("*.json"))
    if not files:
        raise EvalError(f"{folder}: no GeoPixelD <patch>.json files")
    images: list[GcgImage] = []
    ann_id = 1
    for file in files:
        image = read_geopixeld_record(file, first_ann_id=ann_id)
        ann_id += len(image.anns)
        images.append(image)
    return images


def image_path_for(json_file: Path) -> Path:
    """The image file that sits next to a GeoPixelD annotation file.

    Args:
        json_file: ``<patch>.json``.

    Returns:
        ``<patch>.png`` (or another raster suffix that exists).
    """
    for suffix in _IMAGE_SUFFIXES:
        candidate = json_file.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    raise EvalError(f"{json_file.name}: no image file {json_file.stem}.png next to it")


def read_geopixeld_record(file: Path, *, first_ann_id: int = 1) -> GcgImage:
    """Convert one GeoPixelD annotation file into a GCG ground-truth record.

    Args:
        file: ``<patch>.json`` with ``gcg_description`` and ``polygons``.
        first_ann_id: COCO annotation id of its first mask.

    Returns:
        The GT record; the image size is read from the image file's header.
    """
    from PIL import Image

    try:
        record = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EvalError(f"{file}: cannot read JSON ({exc})") from exc
    text, polygons = record.get("gcg_description"), record.get("polygons")
    if not isinstance(text, str) or not isinstance(polygons, list):
        raise EvalError(f"{file.name}: needs 'gcg_description' (str) and 'polygons' (list)")
    labels = [p.strip() for p in PHRASE_RE.findall(text)]
    n_seg = text.count("[SEG]")
    if not len(labels) == n_seg == len(polygons):
        raise EvalError(
            f"{file.name}: {len(labels)} phrases, {n_seg} [SEG] and {len(polygons)} polygon "
            "lists; GeoPixelD needs one mask per phrase"
        )
    with Image.open(image_path_for(file)) as im:  # reads the header only
        width, height = im.size
    caption = text
    for marker in ("<p>", "</p>", "[SEG]"):
        caption = caption.replace(marker, "")
    caption = " ".join(caption.split())
    masks = [
        polygons_to_rle(p, height, width, where=f"{file.name} phrase {i}") for i, p in enumerate(polygons)
    ]
    anns = [_annotation(first_ann_id + i, file.stem, m) for i, m in enumerate(masks)]
    return GcgImage(file.stem, height, width, caption, labels, masks, anns, image_path=image_path_for(file))


def polygons_to_rle(polys: Any, height: int, width: int, *, where: str) -> Rle:
    """Union of one phrase's polygons as a compressed RLE (pycocotools fill + merge).

    Args:
        polys: List of polygons, each a list of ``[x, y]`` pixel points.
        height: Image height.
        width: Image width.
        where: Name of the record for messages.

    Returns:
        ``{"size": [H, W], "counts": str}``.
    """
    from pycocotools import mask as mask_utils

    if not isinstance(polys, list):
        raise EvalError(f"{where}: polygons must be a list of point lists")
    flat: list[list[float]] = []
    for poly in polys:
        try:
            coords = [float(v) for pt in poly for v in pt]
        except (TypeError, ValueError) as exc:
            raise EvalError(f"{where}: a polygon must be a list of [x, y] points") from exc
        if len(coords) >= 6:  # pycocotools needs three points; shorter traces cover no pixel
            flat.append(coords)
    if not flat:
        rle = mask_utils.encode(_zeros(height, width))
    else:
        rle = mask_utils.merge(mask_utils.frPyObjects(flat, height, width))
    return {"size": [int(height), int(width)], "counts": rle["counts"].decode("ascii")}


def _zeros(height: int, width: int) -> Any:
    import numpy as np

    return np.zeros((height, width), dtype=np.uint8, order="F")


def _annotation(ann_id: int, image_id: str, rle: Rle) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    coco = {"size": rle["size"], "counts": rle["counts"].encode()}
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "segmentation": rle,
        "iscrowd": 0,
        "area": float(mask_utils.area(coco)),
        "bbox": [float(v) for v in mask_utils.toBbox(coco)],
    }
