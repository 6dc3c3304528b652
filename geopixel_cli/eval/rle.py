"""COCO run-length masks: strict validation, encoding, decoding and pixel IoU matrices.

Every mask that enters the evaluator goes through :func:`check_rle`, which parses the compressed
counts string in numpy (the same LEB128-like code as pycocotools' ``rleFrString``) and checks
that the runs cover exactly ``height * width`` pixels. pycocotools' C decoder trusts its input
and would write past its buffer on a malformed string, so nothing unchecked reaches it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from geopixel_cli.eval.errors import EvalError

Rle = dict[str, Any]

_MAX_CHARS_PER_COUNT = 12  # 60 bits: far beyond any real run length


def check_rle(obj: object, *, where: str, size: tuple[int, int] | None = None) -> Rle:
    """Validate a COCO RLE and return it in compressed form (``counts`` is a str).

    Args:
        obj: ``{"size": [H, W], "counts": str | bytes | list[int]}`` as read from JSON.
        where: Name of the record, used in error messages.
        size: Expected ``(H, W)``; a different size is an error.

    Returns:
        ``{"size": [H, W], "counts": str}``.

    Raises:
        EvalError: Not a dict, bad size, malformed counts, runs not covering H*W pixels or a
            size different from ``size``.
    """
    if not isinstance(obj, dict) or "size" not in obj or "counts" not in obj:
        raise EvalError(f"{where}: not a COCO RLE dict with 'size' and 'counts'")
    hw = obj["size"]
    if not (isinstance(hw, list | tuple) and len(hw) == 2 and all(isinstance(v, int) and v >= 0 for v in hw)):
        raise EvalError(f"{where}: RLE 'size' must be [height, width], got {hw!r}")
    h, w = int(hw[0]), int(hw[1])
    counts = obj["counts"]
    if isinstance(counts, list):
        runs = _check_run_list(counts, where=where)
        text = _encode_runs(runs)
    elif isinstance(counts, str | bytes):
        text = counts.decode("ascii", "replace") if isinstance(counts, bytes) else counts
        runs = decode_counts(text, where=where)
    else:
        raise EvalError(f"{where}: RLE 'counts' must be a string or a list of ints")
    total = int(runs.sum())
    if total != h * w:
        raise EvalError(f"{where}: malformed RLE, runs cover {total} pixels but size {h}x{w} has {h * w}")
    if size is not None and (h, w) != tuple(size):
        raise EvalError(f"{where}: mask size {h}x{w} differs from the image size {size[0]}x{size[1]}")
    return {"size": [h, w], "counts": text}


def _check_run_list(counts: list[Any], *, where: str) -> np.ndarray:
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise EvalError(f"{where}: uncompressed RLE 'counts' must be non-negative ints")
    return np.asarray(counts, dtype=np.int64)


def decode_counts(text: str, *, where: str = "mask") -> np.ndarray:
    """Parse a compressed COCO RLE counts string into run lengths.

    Args:
        text: The compressed counts (pycocotools' ``rleToString`` alphabet, chars 48..111).
        where: Name of the record, used in error messages.

    Returns:
        (R,) int64 run lengths, alternating background / foreground, starting with background.

    Raises:
        EvalError: Characters outside the alphabet, a truncated number or a negative run.
    """
    if not text:
        return np.zeros(0, np.int64)
    try:
        raw = np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    except UnicodeEncodeError as exc:
        raise EvalError(f"{where}: malformed RLE, non-ASCII character in counts") from exc
    if raw.min() < 0 or raw.max() > 63:
        raise EvalError(f"{where}: malformed RLE, character outside the COCO alphabet in counts")
    more = (raw & 0x20) != 0
    if more[-1]:
        raise EvalError(f"{where}: malformed RLE, counts string ends inside a number")
    ends = np.flatnonzero(~more)  # last char of each number
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > _MAX_CHARS_PER_COUNT:
        raise EvalError(f"{where}: malformed RLE, run length too large")
    group = np.repeat(np.arange(len(ends)), lengths)
    k = np.arange(len(raw)) - starts[group]
    values = np.zeros(len(ends), np.int64)
    np.add.at(values, group, (raw & 0x1F) << (5 * k))
    negative = (raw[ends] & 0x10) != 0  # sign bit of the last 5-bit group
    values = values - np.where(negative, np.left_shift(np.int64(1), 5 * lengths), 0)
    # From the fourth number on, each value is a delta to the run two places earlier.
    runs = values.copy()
    runs[2::2] = np.cumsum(values[2::2])
    runs[1::2] = np.cumsum(values[1::2])
    if runs.min() < 0:
        raise EvalError(f"{where}: malformed RLE, negative run length")
    return runs


def _encode_runs(runs: np.ndarray) -> str:
    """Compress run lengths into the COCO counts string (pycocotools' ``rleToString``)."""
    out = bytearray()
    for i, run in enumerate(runs.tolist()):
        x = int(run) - int(runs[i - 2]) if i > 2 else int(run)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(c + 48)
    return out.decode("ascii")


def encode_mask(mask: np.ndarray) -> Rle:
    """Encode one (H, W) boolean mask as a compressed RLE with a str ``counts`` (JSON-ready).

    Args:
        mask: (H, W) array; non-zero = foreground.

    Returns:
        ``{"size": [H, W], "counts": str}``.
    """
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_masks(rles: list[Rle], size: tuple[int, int]) -> np.ndarray:
    """Decode validated RLEs into a stack of masks.

    Args:
        rles: Compressed RLEs, all of size ``size``.
        size: (H, W).

    Returns:
        (N, H, W) uint8 0/1.
    """
    from pycocotools import mask as mask_utils

    if not rles:
        return np.zeros((0, *size), np.uint8)
    return np.stack([mask_utils.decode({"size": r["size"], "counts": r["counts"].encode()}) for r in rles])


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixel IoU of every mask in ``a`` against every mask in ``b``.

    Equals GLaMM's ``compute_iou`` pair by pair bit for bit: both are an exact integer count
    divided once in float64; 0/0 gives NaN, as there.

    Args:
        a: (N, H, W) 0/1 masks.
        b: (M, H, W) 0/1 masks.

    Returns:
        (N, M) float64.
    """
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return np.zeros((n, m), np.float64)
    pixels = a.shape[1] * a.shape[2]
    dtype = np.float32 if pixels < 2**24 else np.float64  # integer-exact accumulation
    fa = a.reshape(n, -1).astype(dtype)  # (N, HW)
    fb = b.reshape(m, -1).astype(dtype)  # (M, HW)
    inter = np.rint(np.matmul(fa, fb.T)).astype(np.int64)  # (N, M)
    union = fa.sum(1, dtype=np.int64)[:, None] + fb.sum(1, dtype=np.int64)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / union
