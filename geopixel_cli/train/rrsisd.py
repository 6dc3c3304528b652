"""RRSIS-D (referring remote-sensing segmentation) read natively or converted to the GeoPixel format.

Native layout (DATASETS.md §3.2, the RMSIN repository)::

    ROOT/rrsisd/refs(unc).p        pickle: list of refs (ref_id, ann_id, image_id, split, sentences)
    ROOT/rrsisd/instances.json     COCO: images, annotations (segmentation polygons or RLE)
    ROOT/images/rrsisd/JPEGImages/<file_name>

Each (ref, sentence) becomes one record with the GeoPixel-7B-RES conversation (DATASETS.md §3.3):
user ``Could you provide a segmentation mask for {sentence} in this image?``, assistant
``Sure, it is [SEG].``. The mask follows the REFER API: COCO polygons/RLE decoded, components
summed, and pixels equal to 1 kept (as RMSIN does). ``refs(unc).p`` is a Python pickle: only read
dataset files you trust.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from geopixel_cli.train.rasterize import mask_to_rle
from geopixel_cli.train.records import Record, TrainDataError

QUESTION = "Could you provide a segmentation mask for {sentence} in this image?"
ANSWER = "Sure, it is [SEG]."
REFS_NAME = "refs(unc).p"


def is_rrsisd_root(path: Path) -> bool:
    """True when ``path`` looks like a native RRSIS-D root (``rrsisd/refs(unc).p`` present)."""
    return (path / "rrsisd" / REFS_NAME).is_file()


def coco_segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """REFER ``getMask``: COCO polygons or RLE → summed components → pixels equal to 1.

    Args:
        segmentation: COCO ``segmentation`` (list of flat polygons, or an RLE dict).
        height: Image height.
        width: Image width.

    Returns:
        (H, W) uint8 {0, 1} mask.
    """
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rles = segmentation
    decoded = mask_utils.decode(rles)
    if decoded.ndim == 3:
        decoded = decoded.sum(axis=2)
    return (decoded == 1).astype(np.uint8)


def _load_native(root: Path) -> tuple[list[dict], dict[int, dict], dict[int, dict]]:
    refs_path = root / "rrsisd" / REFS_NAME
    inst_path = root / "rrsisd" / "instances.json"
    if not inst_path.is_file():
        raise TrainDataError(f"{inst_path}: RRSIS-D instances.json not found")
    try:
        with refs_path.open("rb") as fh:
            refs = pickle.load(fh)  # noqa: S301 - the dataset's own format
    except Exception as exc:  # a broken pickle raises many types
        raise TrainDataError(f"{refs_path}: cannot read the refs pickle: {exc}") from exc
    try:
        instances = json.loads(inst_path.read_text())
    except json.JSONDecodeError as exc:
        raise TrainDataError(f"{inst_path}: malformed JSON: {exc}") from exc
    images = {int(im["id"]): im for im in instances.get("images", [])}
    anns = {int(a["id"]): a for a in instances.get("annotations", [])}
    if not isinstance(refs, list):
        raise TrainDataError(f"{refs_path}: expected a list of refs")
    return refs, images, anns


def _sentences(ref: dict, all_sentences: bool) -> list[str]:
    sents = [str(s.get("sent") or s.get("raw") or "").strip() for s in ref.get("sentences", [])]
    sents = [s for s in sents if s]
    return sents if all_sentences else sents[:1]


def rrsisd_records(root: Path, *, split: str = "train", all_sentences: bool = True) -> list[Record]:
    """Read a native RRSIS-D split as training records.

    Args:
        root: Dataset root (holding ``rrsisd/`` and ``images/``).
        split: ``train``, ``val`` or ``test``.
        all_sentences: One record per sentence (True) or per ref with its first sentence.

    Returns:
        Records with ``mask_kind='coco'``.

    Raises:
        TrainDataError: Missing files, unknown ids, or an empty split.
    """
    refs, images, anns = _load_native(root)
    image_dir = root / "images" / "rrsisd" / "JPEGImages"
    records: list[Record] = []
    for k, ref in enumerate(refs):
        if ref.get("split") != split:
            continue
        where = f"{root / 'rrsisd' / REFS_NAME}[{k}] (ref_id {ref.get('ref_id')})"
        ann = anns.get(int(ref.get("ann_id", -1)))
        image = images.get(int(ref.get("image_id", -1)))
        if ann is None or image is None:
            raise TrainDataError(f"{where}: ann_id/image_id not in instances.json")
        path = image_dir / str(image["file_name"])
        if not path.is_file():
            raise TrainDataError(f"{where}: image not found: {path}")
        for sentence in _sentences(ref, all_sentences):
            turns = (("user", QUESTION.format(sentence=sentence)), ("assistant", ANSWER))
            records.append(Record(where, turns, path, "coco", [ann["segmentation"]]))
    if not records:
        raise TrainDataError(f"{root}: no RRSIS-D refs in split {split!r}")
    return records


def convert_rrsisd(root: Path, output: Path, *, split: str = "train", all_sentences: bool = True) -> int:
    """Write a split as a GeoPixel-format JSON list with one compressed RLE per ``[SEG]``.

    Args:
        root: Native dataset root.
        output: JSON list to write.
        split: Split name.
        all_sentences: One record per sentence, or per ref.

    Returns:
        Number of records written.
    """
    from PIL import Image

    records = rrsisd_records(root, split=split, all_sentences=all_sentences)
    sizes: dict[Path, tuple[int, int]] = {}
    items = []
    for i, rec in enumerate(records):
        if rec.image not in sizes:
            with Image.open(rec.image) as img:
                sizes[rec.image] = img.size
        width, height = sizes[rec.image]
        mask = coco_segmentation_to_mask(rec.mask_source[0], height, width)
        items.append(
            {
                "id": i,
                "conversations": [
                    {"from": "human" if role == "user" else "bot", "value": text}
                    for role, text in rec.conversations
                ],
                "image": str(rec.image.resolve()),
                "segmentation": [mask_to_rle(mask)],
            }
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(items))
    return len(items)
