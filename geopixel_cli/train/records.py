"""GeoPixelD-format training lists: parse, validate, and load one record (image + masks + text).

Format (DATASETS.md §1.4): a JSON list of records with ``conversations`` (``from``/``value`` turns),
``image`` (path) and, for grounding data, ``polygons`` (path to a per-patch JSON whose ``polygons``
key lists, per ``[SEG]``, the polygons of that mask) or ``segmentation`` (one compressed COCO RLE per
``[SEG]``). Relative paths are resolved against the list's folder, then its parent (the reference
writes them relative to the repository root, one level above ``data/``), then the working directory.

Everything that can be checked without decoding pixels is checked when the list is read, so a bad
dataset fails before training starts, with the file and the record index in the message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from geopixel_cli.errors import UserError
from geopixel_cli.train.rasterize import polygons_to_mask, rle_to_mask

SEG = "[SEG]"
USER_ROLES = ("human", "user")


class TrainDataError(UserError):
    """A training dataset is unusable; the message names the file and the record.

    A :class:`~geopixel_cli.errors.UserError` (hence an ``Exception``): the CLI prints it as one line.
    """


@dataclass(frozen=True)
class Record:
    """One training example as listed (nothing decoded yet).

    Attributes:
        where: ``file.json[index]`` for error messages.
        conversations: ``(role, text)`` turns, role ``user`` or ``assistant``, text stripped.
        image: Resolved image path.
        mask_kind: ``polygons`` (per-patch JSON), ``rle`` (COCO RLE list), ``coco`` (RRSIS-D
            annotation segmentation: polygons or RLE in COCO convention) or ``none``.
        mask_source: Path to the polygon file, or the list of RLE / COCO segmentations.
    """

    where: str
    conversations: tuple[tuple[str, str], ...]
    image: Path
    mask_kind: str
    mask_source: Any

    @property
    def n_seg(self) -> int:
        """Number of ``[SEG]`` strings in the whole conversation."""
        return sum(text.count(SEG) for _, text in self.conversations)


@dataclass
class Sample:
    """A decoded record.

    Attributes:
        where: Origin, for messages.
        conversations: ``(role, text)`` turns.
        image: RGB PIL image.
        masks: (N, H, W) uint8 ground-truth masks in ``[SEG]`` order.
    """

    where: str
    conversations: tuple[tuple[str, str], ...]
    image: Image.Image
    masks: np.ndarray


def resolve_path(raw: str, base: Path) -> Path:
    """Resolve a path written in a list file (list folder, its parent, then the working directory).

    Args:
        raw: Path as written.
        base: Folder of the list file.

    Returns:
        The first existing candidate, or the list-folder candidate when none exists.
    """
    path = Path(raw).expanduser()
    if path.is_absolute():
        return path
    for candidate in (base / path, base.parent / path, Path.cwd() / path):
        if candidate.exists():
            return candidate
    return base / path


def _parse_conversations(raw: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise TrainDataError(f"{where}: 'conversations' must be a non-empty list of turns")
    turns = []
    for k, turn in enumerate(raw):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise TrainDataError(f"{where}: conversation turn {k} needs string 'from' and 'value'")
        role = "user" if str(turn["from"]).lower() in USER_ROLES else "assistant"
        turns.append((role, turn["value"].strip()))
    if not any(role == "assistant" for role, _ in turns):
        raise TrainDataError(f"{where}: no assistant turn to learn from")
    return tuple(turns)


def _image_size(path: Path, where: str) -> tuple[int, int]:
    if not path.is_file():
        raise TrainDataError(f"{where}: image not found: {path}")
    try:
        with Image.open(path) as img:
            return img.size
    except Exception as exc:  # PIL raises several types for unreadable files
        raise TrainDataError(f"{where}: cannot read image {path}: {exc}") from exc


def _read_polygon_file(path: Path, where: str) -> list:
    if not path.is_file():
        raise TrainDataError(f"{where}: polygon file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrainDataError(f"{where}: malformed JSON in polygon file {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("polygons"), list):
        raise TrainDataError(f"{where}: polygon file {path} has no 'polygons' list")
    return data["polygons"]


def check_polygons(polygons: Any, width: int, height: int, where: str) -> None:
    """Validate the ``polygons`` structure: masks → polygons → ``[x, y]`` points inside the image.

    Args:
        polygons: Parsed ``polygons`` value.
        width: Image width.
        height: Image height.
        where: Record origin for messages.

    Raises:
        TrainDataError: Bad nesting, fewer than 3 points, or a point outside ``[0, W] x [0, H]``.
    """
    for m, mask in enumerate(polygons):
        if not isinstance(mask, list) or not mask:
            raise TrainDataError(f"{where}: mask {m} must be a non-empty list of polygons")
        for p, poly in enumerate(mask):
            try:
                pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
            except (ValueError, TypeError) as exc:
                raise TrainDataError(f"{where}: mask {m} polygon {p} is not a list of [x, y] points") from exc
            if len(pts) < 3:
                raise TrainDataError(f"{where}: mask {m} polygon {p} has {len(pts)} points (need 3)")
            bad = (pts[:, 0] < 0) | (pts[:, 0] > width) | (pts[:, 1] < 0) | (pts[:, 1] > height)
            if bad.any():
                x, y = pts[int(np.argmax(bad))]
                raise TrainDataError(
                    f"{where}: mask {m} polygon {p} has point ({x:g}, {y:g}) "
                    f"outside the {width}x{height} image"
                )


def parse_record(raw: Any, base: Path, where: str, *, check_files: bool = True) -> Record:
    """Parse and validate one list entry.

    Args:
        raw: The JSON object.
        base: Folder of the list file.
        where: ``file[index]`` for messages.
        check_files: Open the image header and the polygon file to check sizes and counts.

    Returns:
        The record.

    Raises:
        TrainDataError: Anything that would make the example wrong.
    """
    if not isinstance(raw, dict):
        raise TrainDataError(f"{where}: record must be a JSON object")
    conversations = _parse_conversations(raw.get("conversations"), where)
    image_raw = raw.get("image")
    if not isinstance(image_raw, str):
        raise TrainDataError(f"{where}: 'image' must be one image path (grounding data has exactly one)")
    image = resolve_path(image_raw, base)
    n_seg = sum(text.count(SEG) for _, text in conversations)
    source: Any
    if "polygons" in raw:
        kind, source = "polygons", resolve_path(str(raw["polygons"]), base)
    elif "segmentation" in raw:
        kind, source = "rle", raw["segmentation"]
        if not isinstance(source, list):
            raise TrainDataError(f"{where}: 'segmentation' must be a list of COCO RLE dicts")
    elif n_seg:
        raise TrainDataError(f"{where}: {n_seg} [SEG] in the text but no 'polygons' or 'segmentation' key")
    else:
        kind, source = "none", None
    record = Record(where, conversations, image, kind, source)
    if check_files:
        width, height = _image_size(image, where)
        n_masks = 0
        if kind == "polygons":
            polygons = _read_polygon_file(source, where)
            check_polygons(polygons, width, height, f"{where} ({source.name})")
            n_masks = len(polygons)
        elif kind == "rle":
            for k, rle in enumerate(source):
                size = rle.get("size") if isinstance(rle, dict) else None
                if size is None or [int(v) for v in size] != [height, width]:
                    raise TrainDataError(
                        f"{where}: segmentation {k} size {size} is not the image's [{height}, {width}]"
                    )
            n_masks = len(source)
        if n_masks != n_seg:
            raise TrainDataError(f"{where}: {n_seg} [SEG] in the text but {n_masks} masks")
    return record


def read_json_list(path: Path, *, check_files: bool = True) -> list[Record]:
    """Read a GeoPixelD-format JSON list.

    Args:
        path: The list file.
        check_files: Validate images and mask files now (header reads only).

    Returns:
        Records in file order.

    Raises:
        TrainDataError: Missing file, malformed JSON, not a list, or any bad record.
    """
    if not path.is_file():
        raise TrainDataError(f"{path}: dataset list not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrainDataError(f"{path}: malformed JSON: {exc}") from exc
    if not isinstance(data, list):
        raise TrainDataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    if not data:
        raise TrainDataError(f"{path}: the list is empty")
    base = path.resolve().parent
    return [parse_record(item, base, f"{path}[{i}]", check_files=check_files) for i, item in enumerate(data)]


def _decode_masks(record: Record, width: int, height: int) -> np.ndarray:
    if record.mask_kind == "polygons":
        polygons = _read_polygon_file(record.mask_source, record.where)
        check_polygons(polygons, width, height, record.where)
        masks = [polygons_to_mask(mask, height, width) for mask in polygons]
    elif record.mask_kind == "rle":
        try:
            masks = [rle_to_mask(rle, height, width) for rle in record.mask_source]
        except ValueError as exc:
            raise TrainDataError(f"{record.where}: {exc}") from exc
    elif record.mask_kind == "coco":
        from geopixel_cli.train.rrsisd import coco_segmentation_to_mask

        masks = [coco_segmentation_to_mask(seg, height, width) for seg in record.mask_source]
    else:
        masks = []
    if len(masks) != record.n_seg:
        raise TrainDataError(f"{record.where}: {record.n_seg} [SEG] in the text but {len(masks)} masks")
    if not masks:
        return np.zeros((0, height, width), dtype=np.uint8)
    return np.stack(masks)


def load_sample(record: Record) -> Sample:
    """Decode a record: RGB image (``convert('RGB')`` as training does) and its (N, H, W) masks.

    Args:
        record: A parsed record.

    Returns:
        The decoded sample.

    Raises:
        TrainDataError: Unreadable image or masks inconsistent with the text.
    """
    if not record.image.is_file():
        raise TrainDataError(f"{record.where}: image not found: {record.image}")
    try:
        with Image.open(record.image) as img:
            image = img.convert("RGB")
    except Exception as exc:  # PIL raises several types for unreadable files
        raise TrainDataError(f"{record.where}: cannot read image {record.image}: {exc}") from exc
    masks = _decode_masks(record, image.width, image.height)
    return Sample(record.where, record.conversations, image, masks)
