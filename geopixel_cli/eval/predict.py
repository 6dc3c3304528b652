"""Run a GeoPixel model over an evaluation set and keep its answers in GLaMM's record layout.

GCG (GLaMM ``infer.py``): caption = the cleaned response, phrases = every ``<p>...</p>`` span
(also those without a ``[SEG]``), masks = one per ``[SEG]`` in generation order, at the image
size, binarised at logit > 0 by the model. RRSIS: the mask of the first ``[SEG]``; an answer
without ``[SEG]`` is an empty mask (EVALUATION.md 2).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from geopixel_cli.eval.errors import EvalError
from geopixel_cli.eval.gcg_data import GcgImage, GcgPrediction, caption_from_text, phrases_from_text
from geopixel_cli.eval.rle import Rle, encode_mask
from geopixel_cli.eval.rrsis import RrsisSample


class Model(Protocol):
    """What the evaluator needs from :class:`geopixel.GeoPixel`."""

    def describe_batch(
        self,
        images: Sequence[np.ndarray],
        *,
        prompt: str | None = None,
        hd_num: int = 9,
        max_new_tokens: int = 1024,
    ) -> list[Any]:
        """Grounded descriptions, one ``GeoPixelResult`` per image."""
        ...

    def segment_batch(
        self,
        images: Sequence[np.ndarray],
        expression: str | Sequence[str],
        *,
        hd_num: int = 9,
        max_new_tokens: int = 64,
    ) -> list[Any]:
        """Referring segmentation, one ``GeoPixelResult`` per image."""
        ...


def read_rgb(path: Path | None, *, where: str, size: tuple[int, int]) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB and check it has the ground truth's size.

    Args:
        path: Image file.
        where: Name of the record for messages.
        size: Expected (H, W).

    Returns:
        (H, W, 3) uint8.
    """
    from PIL import Image

    if path is None or not path.is_file():
        raise EvalError(f"{where}: image file not found ({path}); running a model needs the images")
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    if rgb.shape[:2] != tuple(size):
        raise EvalError(
            f"{where}: image {path.name} is {rgb.shape[0]}x{rgb.shape[1]}, GT masks are {size[0]}x{size[1]}"
        )
    return rgb


def _batches(n: int, batch_size: int) -> Iterator[range]:
    for start in range(0, n, max(1, batch_size)):
        yield range(start, min(n, start + max(1, batch_size)))


def _masks_of(result: Any, size: tuple[int, int], *, where: str) -> list[np.ndarray]:
    masks = np.asarray(result.masks)
    if masks.size == 0:
        return []
    if masks.ndim != 3 or masks.shape[1:] != tuple(size):
        raise EvalError(
            f"{where}: model returned masks of shape {masks.shape}, expected (N, {size[0]}, {size[1]})"
        )
    return [m.astype(bool) for m in masks]


def predict_gcg(
    model: Model,
    images: list[GcgImage],
    *,
    batch_size: int = 1,
    hd_num: int = 9,
    max_new_tokens: int = 1024,
    progress: bool = True,
) -> dict[str, GcgPrediction]:
    """Describe every GT image and turn each answer into GLaMM's prediction record.

    Args:
        model: A loaded GeoPixel (or anything with ``describe_batch``).
        images: Ground truth with image paths.
        batch_size: Images per model call.
        hd_num: Crop budget of the HD divider.
        max_new_tokens: Generation limit.
        progress: Show a progress bar on stderr.

    Returns:
        Image id -> prediction.
    """
    out: dict[str, GcgPrediction] = {}
    with _progress(progress, "describe", len(images)) as advance:
        for idx in _batches(len(images), batch_size):
            batch = [images[i] for i in idx]
            rgbs = [
                read_rgb(im.image_path, where=f"image {im.image_id}", size=(im.height, im.width))
                for im in batch
            ]
            results = model.describe_batch(rgbs, hd_num=hd_num, max_new_tokens=max_new_tokens)
            for im, res in zip(batch, results, strict=True):
                masks = _masks_of(res, (im.height, im.width), where=f"image {im.image_id}")
                out[im.image_id] = GcgPrediction(
                    im.image_id,
                    caption_from_text(res.text),
                    phrases_from_text(res.text),
                    [encode_mask(m) for m in masks],
                )
            advance(len(batch))
    return out


def predict_rrsis(
    model: Model,
    samples: list[RrsisSample],
    *,
    batch_size: int = 1,
    hd_num: int = 9,
    max_new_tokens: int = 64,
    progress: bool = True,
) -> dict[str, Rle]:
    """Segment every referring sentence; the first ``[SEG]`` mask, or an empty mask.

    Args:
        model: A loaded GeoPixel (or anything with ``segment_batch``).
        samples: Ground truth with image paths.
        batch_size: Sentences per model call.
        hd_num: Crop budget of the HD divider.
        max_new_tokens: Generation limit.
        progress: Show a progress bar on stderr.

    Returns:
        Sample id -> predicted mask RLE at the GT size.
    """
    out: dict[str, Rle] = {}
    with _progress(progress, "segment", len(samples)) as advance:
        for idx in _batches(len(samples), batch_size):
            batch = [samples[i] for i in idx]
            rgbs = [
                read_rgb(s.image_path, where=f"sample {s.sample_id}", size=(s.height, s.width)) for s in batch
            ]
            results = model.segment_batch(
                rgbs, [s.sentence for s in batch], hd_num=hd_num, max_new_tokens=max_new_tokens
            )
            for s, res in zip(batch, results, strict=True):
                masks = _masks_of(res, (s.height, s.width), where=f"sample {s.sample_id}")
                out[s.sample_id] = encode_mask(masks[0] if masks else np.zeros((s.height, s.width), bool))
            advance(len(batch))
    return out


class _progress:
    """Context manager yielding ``advance(n)``; a rich progress bar on stderr when enabled."""

    def __init__(self, enabled: bool, label: str, total: int) -> None:
        self.enabled, self.label, self.total = enabled, label, total
        self.bar: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def check_gcg_destination(folder: Path, image_ids: list[str], *, overwrite: bool) -> None:
    """Refuse a ``--save-predictions`` folder that cannot take one ``<image_id>.json`` per image.

    Called before the model runs, so a clash costs nothing.

    Args:
        folder: Output folder (may not exist yet).
        image_ids: The images that will be predicted.
        overwrite: Replace existing files; otherwise an existing file is an error.

    Raises:
        EvalError: ``folder`` is a file, or holds a prediction file of these images.
    """
    if folder.exists() and not folder.is_dir():
        raise EvalError(f"--save-predictions {folder} is a file; gcg predictions go to a folder")
    clashes = [i for i in image_ids if (folder / f"{i}.json").exists()]
    if clashes and not overwrite:
        raise EvalError(f"{folder / (clashes[0] + '.json')} exists (use --overwrite)")


def check_rrsis_destination(path: Path, *, overwrite: bool) -> None:
    """Refuse a ``--save-predictions`` file that exists (without ``overwrite``) or is a folder.

    Args:
        path: Output JSON file.
        overwrite: Replace an existing file.

    Raises:
        EvalError: On a clash.
    """
    if path.is_dir():
        raise EvalError(f"--save-predictions {path} is a folder; rrsis predictions go to one JSON file")
    if path.exists() and not overwrite:
        raise EvalError(f"{path} exists (use --overwrite)")


def save_gcg_predictions(preds: dict[str, GcgPrediction], folder: Path, *, overwrite: bool = False) -> None:
    """Write one ``<image_id>.json`` per image (the layout ``--predictions`` reads back).

    Args:
        preds: Image id -> prediction.
        folder: Output folder (created).
        overwrite: Replace existing files; otherwise an existing file is an error.
    """
    check_gcg_destination(folder, list(preds), overwrite=overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    for image_id, pred in preds.items():
        (folder / f"{image_id}.json").write_text(json.dumps(pred.to_json()))


def save_rrsis_predictions(preds: dict[str, Rle], path: Path, *, overwrite: bool = False) -> None:
    """Write ``{"predictions": [{sample_id, mask}]}`` (the layout ``--predictions`` reads back).

    Args:
        preds: Sample id -> mask RLE.
        path: Output JSON file.
        overwrite: Replace an existing file.
    """
    check_rrsis_destination(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{"sample_id": sid, "mask": rle} for sid, rle in preds.items()]
    path.write_text(json.dumps({"predictions": records}))
