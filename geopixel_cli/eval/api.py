"""Python entry points of ``geopixel eval``: ground truth + (predictions | model) -> report dict.

Example::

    from pathlib import Path
    from geopixel_cli.eval.api import run_eval
    report = run_eval("gcg", Path("golden/eval/gcg"), predictions=Path("golden/eval/gcg/predictions"),
                      text_model="minilm")
    report["splits"]["overall"]["AP50"]
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from geopixel_cli.eval.errors import EvalError
from geopixel_cli.eval.gcg import IOU_ONLY, SimilarityFn, evaluate_gcg, iou_only_similarity

TASKS = ("gcg", "rrsis")
Notify = Callable[[str], None]


def run_eval(
    task: str,
    data: Path,
    *,
    predictions: Path | None = None,
    model: Any = None,
    text_model: str | None = "auto",
    similarity: SimilarityFn | None = None,
    similarity_variant: str = "custom",
    splits_file: Path | None = None,
    split: str = "test",
    save_predictions: Path | None = None,
    overwrite: bool = False,
    hd_num: int = 9,
    batch_size: int = 1,
    max_new_tokens: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = False,
    notify: Notify | None = None,
) -> dict[str, Any]:
    """Score saved predictions, or run a model and score its answers.

    Args:
        task: ``gcg`` or ``rrsis``.
        data: GT (gcg: folder with GLaMM's COCO pair or a GeoPixelD test folder; rrsis: ``gt.json``
            or an RRSIS-D folder).
        predictions: Saved predictions (gcg: folder of ``<image_id>.json`` or one JSON list;
            rrsis: ``predictions.json``). Exclusive with ``model``.
        model: A loaded GeoPixel (object with ``describe_batch``/``segment_batch``) or a model
            directory / hub id, loaded by :func:`geopixel_cli.loader.load_model` once the ground
            truth is read and the ``save_predictions`` destination is checked. Exclusive with
            ``predictions``.
        text_model: Recall's text model (see :func:`~geopixel_cli.eval.textsim.resolve_text_model`).
        similarity: Inject a similarity function instead (e.g. precomputed matrices in tests).
        similarity_variant: Report key of the injected similarity's Recall.
        splits_file: gcg: Uni/Multi-Target id lists; default ``splits.json`` next to the GT, else
            the one-phrase rule.
        split: rrsis: RRSIS-D split to read from a native folder.
        save_predictions: Model mode: also write the predictions in the ``predictions`` layout.
        overwrite: Replace existing output files.
        hd_num: Model mode: HD crop budget.
        batch_size: Model mode: images per call.
        max_new_tokens: Model mode: generation limit [default: 1024 gcg, 64 rrsis].
        device: Model mode, when ``model`` is a path: torch device [default: automatic].
        dtype: Model mode, when ``model`` is a path: ``bf16``/``fp16``/``fp32`` [default: automatic].
        progress: Model mode: progress bar on stderr.
        notify: Called with human-readable notes (text model used, split rule, ignored records).

    Returns:
        The report: ``task``, ``meta`` and the metric blocks of ``shared/golden/eval/*/expected.json``.
    """
    say = notify or (lambda _msg: None)
    if task not in TASKS:
        raise EvalError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if (predictions is None) == (model is None):
        raise EvalError("give exactly one of --predictions (score saved answers) or --model (run a model)")
    if predictions is not None and save_predictions is not None:
        raise EvalError("--save-predictions only applies when running a model (--model)")
    if isinstance(model, str | Path):
        model = _Lazy(str(model), device, dtype)
    run: dict[str, Any] = dict(
        model=model,
        predictions=predictions,
        save=save_predictions,
        overwrite=overwrite,
        hd_num=hd_num,
        batch_size=batch_size,
        progress=progress,
    )
    if task == "rrsis":
        return _rrsis(data, split=split, max_new_tokens=max_new_tokens or 64, say=say, **run)
    sims = _similarities(text_model, similarity, similarity_variant, say)
    return _gcg(
        data, sims=sims, splits_file=splits_file, max_new_tokens=max_new_tokens or 1024, say=say, **run
    )


class _Lazy:
    """A model named by directory or hub id, loaded only once the inputs and outputs are checked."""

    def __init__(self, name: str, device: str | None, dtype: str | None) -> None:
        self.name, self.device, self.dtype = name, device, dtype

    def load(self) -> Any:
        from geopixel_cli.loader import load_model  # errors are one-line UserErrors

        return load_model(self.name, device=self.device, dtype=self.dtype)


def _ready(model: Any) -> Any:
    """The loaded model (loads a :class:`_Lazy` one)."""
    return model.load() if isinstance(model, _Lazy) else model


def _similarities(
    text_model: str | None, similarity: SimilarityFn | None, variant: str, say: Notify
) -> tuple[dict[str, SimilarityFn], str]:
    if similarity is not None:
        return {variant: similarity, IOU_ONLY: iou_only_similarity}, f"injected ({variant})"
    from geopixel_cli.eval.textsim import resolve_text_model

    chosen = resolve_text_model(text_model)
    if chosen.note:
        say(chosen.note)
    sims: dict[str, SimilarityFn] = {}
    if chosen.variant is not None and chosen.similarity is not None:
        sims[chosen.variant] = chosen.similarity
    sims[IOU_ONLY] = iou_only_similarity
    return sims, chosen.description


def _gcg(
    data: Path,
    *,
    sims: tuple[dict[str, SimilarityFn], str],
    splits_file: Path | None,
    max_new_tokens: int,
    say: Notify,
    model: Any,
    predictions: Path | None,
    save: Path | None,
    overwrite: bool,
    hd_num: int,
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    from geopixel_cli.eval.gcg_data import load_gcg_ground_truth, load_gcg_predictions, resolve_splits

    images = load_gcg_ground_truth(data)
    if splits_file is None and data.is_dir() and (data / "splits.json").is_file():
        splits_file = data / "splits.json"
    splits, rule = resolve_splits(images, splits_file)
    say(f"uni/multi-target split: {rule}")
    extra: list[str] = []
    if predictions is not None:
        preds, extra = load_gcg_predictions(predictions, images)
        if extra:
            say(f"ignored {len(extra)} prediction(s) without a GT image, e.g. {extra[0]}")
    else:
        from geopixel_cli.eval.predict import check_gcg_destination, predict_gcg, save_gcg_predictions

        if save is not None:
            check_gcg_destination(save, [im.image_id for im in images], overwrite=overwrite)
        preds = predict_gcg(
            _ready(model),
            images,
            batch_size=batch_size,
            hd_num=hd_num,
            max_new_tokens=max_new_tokens,
            progress=progress,
        )
        if save is not None:
            save_gcg_predictions(preds, save, overwrite=overwrite)
    if not any(p.masks for p in preds.values()):
        say("no predicted masks at all: AP50, mIoU and Recall are reported as 0")
    similarities, description = sims
    report = evaluate_gcg(images, preds, splits=splits, similarities=similarities)
    meta = {
        "task": "gcg",
        "num_images": len(images),
        "split_rule": rule,
        "recall_text_model": description,
        "recall_variants": list(similarities),
        "ignored_predictions": extra,
        "units": "fractions as the reference code returns them (CIDEr on pycocoevalcap's x10 scale); "
        "papers print x100",
    }
    return {"task": "gcg", "meta": meta, **report}


def _rrsis(
    data: Path,
    *,
    split: str,
    max_new_tokens: int,
    say: Notify,
    model: Any,
    predictions: Path | None,
    save: Path | None,
    overwrite: bool,
    hd_num: int,
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    from geopixel_cli.eval.rrsis import evaluate_rrsis, load_rrsis_ground_truth, load_rrsis_predictions

    samples = load_rrsis_ground_truth(data, split=split)
    extra: list[str] = []
    if predictions is not None:
        preds, extra = load_rrsis_predictions(predictions, samples)
        if extra:
            say(f"ignored {len(extra)} prediction(s) without a GT sample, e.g. {extra[0]}")
    else:
        from geopixel_cli.eval.predict import check_rrsis_destination, predict_rrsis, save_rrsis_predictions

        if save is not None:
            check_rrsis_destination(save, overwrite=overwrite)
        preds = predict_rrsis(
            _ready(model),
            samples,
            batch_size=batch_size,
            hd_num=hd_num,
            max_new_tokens=max_new_tokens,
            progress=progress,
        )
        if save is not None:
            save_rrsis_predictions(preds, save, overwrite=overwrite)
    meta = {
        "task": "rrsis",
        "num_samples": len(samples),
        "ignored_predictions": extra,
        "resolution": "native (main numbers); variants.rmsin_resize_480_nearest = RMSIN/LAVT's 480x480",
        "units": "fractions; RMSIN/LAVT print x100 with 2 decimals",
    }
    return {"task": "rrsis", "meta": meta, **evaluate_rrsis(samples, preds)}
