"""Native RRSIS-D reader (RMSIN's layout, read the way its REFER API and dataset do).

```
ROOT/rrsisd/refs(unc).p          pickle: list of refs {ref_id, ann_id, image_id, split, sentences, ...}
ROOT/rrsisd/instances.json       COCO: images, annotations (polygons or RLE), categories
ROOT/images/rrsisd/JPEGImages/   the images
```

The GT mask of a ref is REFER's ``getMask``: decode every component, sum them, and RMSIN's
dataset keeps the pixels whose sum is exactly 1 as foreground (overlapping parts drop out).
Every sentence of every ref of the split is one sample.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from geopixel_cli.eval.errors import EvalError
from geopixel_cli.eval.rle import encode_mask
from geopixel_cli.eval.rrsis import RrsisSample

_IMAGE_DIRS = ("images/rrsisd/JPEGImages", "JPEGImages", "rrsisd/JPEGImages", "images")


def read_rrsisd(root: Path, *, split: str = "test") -> list[RrsisSample]:
    """Read one split of RRSIS-D as samples (one per sentence).

    Args:
        root: The dataset root (holding ``rrsisd/``) or the ``rrsisd`` folder itself.
        split: ``train``, ``val`` or ``test``.

    Returns:
        The samples, refs in file order, sentences in order.
    """
    ann_dir = root / "rrsisd" if (root / "rrsisd").is_dir() else root
    refs_file, inst_file = ann_dir / "refs(unc).p", ann_dir / "instances.json"
    if not refs_file.is_file() or not inst_file.is_file():
        raise EvalError(
            f"{root}: not an RRSIS-D folder (needs rrsisd/refs(unc).p and rrsisd/instances.json) "
            "nor a gt.json"
        )
    with refs_file.open("rb") as fh:
        refs = pickle.load(fh)  # the dataset's own format
    inst = json.loads(inst_file.read_text())
    images = {im["id"]: im for im in inst.get("images", [])}
    anns = {a["id"]: a for a in inst.get("annotations", [])}
    image_dir = next((root / d for d in _IMAGE_DIRS if (root / d).is_dir()), None)
    samples: list[RrsisSample] = []
    for ref in refs:
        if ref.get("split") != split:
            continue
        samples.extend(_ref_samples(ref, images, anns, image_dir))
    if not samples:
        raise EvalError(f"{refs_file}: no refs with split '{split}'")
    return samples


def _ref_samples(
    ref: dict[str, Any], images: dict[Any, Any], anns: dict[Any, Any], image_dir: Path | None
) -> list[RrsisSample]:
    where = f"RRSIS-D ref {ref.get('ref_id')}"
    image = images.get(ref.get("image_id"))
    ann = anns.get(ref.get("ann_id"))
    if image is None or ann is None:
        raise EvalError(
            f"{where}: image {ref.get('image_id')} or annotation {ref.get('ann_id')} not in instances.json"
        )
    h, w = int(image["height"]), int(image["width"])
    mask = encode_mask(ref_mask(ann["segmentation"], h, w, where=where))
    path = image_dir / image["file_name"] if image_dir is not None else None
    out = []
    for n, sent in enumerate(ref.get("sentences", [])):
        sid = sent.get("sent_id", n)
        text = sent.get("raw") or sent.get("sent") or ""
        out.append(
            RrsisSample(
                f"{ref['ref_id']}_{sid}",
                str(ref["ref_id"]),
                str(ref["image_id"]),
                str(text).strip(),
                h,
                w,
                mask,
                path,
            )
        )
    return out


def ref_mask(segmentation: Any, height: int, width: int, *, where: str) -> np.ndarray:
    """REFER ``getMask`` followed by RMSIN's ``annot[ref_mask == 1] = 1``.

    Args:
        segmentation: COCO polygons (list of flat lists) or an RLE dict.
        height: Image height.
        width: Image width.
        where: Name of the record for messages.

    Returns:
        (H, W) bool mask.
    """
    from pycocotools import mask as mask_utils

    try:
        if isinstance(segmentation, list):
            rles = mask_utils.frPyObjects(segmentation, height, width)
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            rles = [mask_utils.frPyObjects(segmentation, height, width)]
        elif isinstance(segmentation, dict):
            counts = segmentation["counts"]
            counts = counts.encode() if isinstance(counts, str) else counts
            rles = [{"size": segmentation["size"], "counts": counts}]
        else:
            raise TypeError(type(segmentation).__name__)
        m = mask_utils.decode(rles)  # (H, W, K)
    except (TypeError, ValueError, KeyError) as exc:
        raise EvalError(f"{where}: unreadable segmentation ({exc})") from exc
    if m.shape[:2] != (height, width):
        raise EvalError(f"{where}: mask {m.shape[0]}x{m.shape[1]} differs from image {height}x{width}")
    total = m.reshape(height, width, -1).sum(axis=2)
    return total == 1
