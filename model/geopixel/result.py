"""The structured result every GeoPixel call returns (shared by the API, the CLI and eval)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_MARKERS = ("<p>", "</p>", "[SEG]")  # geopixel.tokenizer's BOP_TOKEN, EOP_TOKEN, SEG_TOKEN


@dataclass(frozen=True)
class Phrase:
    """One grounded phrase of a description.

    Attributes:
        text: The phrase between ``<p>`` and ``</p>``, stripped.
        start: Character offset of the phrase in ``GeoPixelResult.text``.
        end: Character offset one past the phrase's end in ``GeoPixelResult.text``.
        mask_index: Index into ``GeoPixelResult.masks`` of the ``[SEG]`` that grounds it, or -1
            when that ``[SEG]`` has no mask (e.g. it was the last token, cut off by
            ``max_new_tokens``). Check ``mask_index >= 0`` before indexing: ``masks[-1]`` would
            silently be another phrase's mask.
    """

    text: str
    start: int
    end: int
    mask_index: int


@dataclass
class GeoPixelResult:
    """Output of ``GeoPixel.describe`` / ``GeoPixel.segment`` for one image.

    Attributes:
        text: The answer as the reference decodes it (special tokens skipped, the literal
            ``[UNUSED_TOKEN_145]`` removed); ``<p>``, ``</p>`` and ``[SEG]`` are kept.
        phrases: Grounded phrases in order (``<p> … </p> [SEG]``).
        masks: (N, H, W) bool at the input image size, one per ``[SEG]``, in order.
        scores: (N,) float32, the mask decoder's predicted IoU of each selected mask.
        token_ids: Generated token ids (without the prompt), ending with ``</s>`` if it stopped.
        seg_hidden: (N, hidden) float32 last-layer hidden states at the ``[SEG]`` positions.
        mask_logits: (N, H, W) float16 mask logits (``masks == mask_logits > 0``), or None
            unless asked for (``keep_mask_logits=True``).
    """

    text: str
    phrases: list[Phrase]
    masks: np.ndarray
    scores: np.ndarray
    token_ids: list[int]
    seg_hidden: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    mask_logits: np.ndarray | None = None

    @property
    def caption(self) -> str:
        """The text without ``<p>``, ``</p>``, ``[SEG]``, whitespace collapsed (:func:`strip_markers`)."""
        return strip_markers(self.text)


def strip_markers(text: str) -> str:
    """Caption of a decoded answer: ``<p>``, ``</p>``, ``[SEG]`` removed, whitespace collapsed.

    The one implementation (``GeoPixelResult.caption`` and ``geopixel.tokenizer.strip_markers``
    are this function; it lives here because the tokenizer imports this module).

    Args:
        text: Decoded answer.

    Returns:
        Markers replaced by spaces, whitespace collapsed, no space before ``, . ; : ! ?``.
    """
    out = text
    for marker in _MARKERS:
        out = out.replace(marker, " ")
    out = " ".join(out.split())
    for punct in (" ,", " .", " ;", " :", " !", " ?"):
        out = out.replace(punct, punct[1:])
    return out
