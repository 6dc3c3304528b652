"""The model interface the pipeline needs, and resolving ``--model`` to a loaded network.

``geopixel`` (and torch) are imported only inside :func:`load_model`, so the CLI's help,
``info`` and all validation stay fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from geopixel_cli.errors import UserError

DEFAULT_MODELS = {"describe": "MBZUAI/GeoPixel-7B", "segment": "MBZUAI/GeoPixel-7B-RES"}
MODEL_ENV = "GEOPIXEL_MODEL"
REQUIRED_FILES = ("config.json", "tokenizer.model")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


class SceneModel(Protocol):
    """What the pipeline calls: ``geopixel.GeoPixel`` or any double with the same methods."""

    def describe_batch(
        self,
        images: list[np.ndarray],
        *,
        prompt: str | None = None,
        hd_num: int = 9,
        max_new_tokens: int = 1024,
    ) -> list[Any]:
        """Grounded descriptions of (H, W, 3) uint8 images, one ``GeoPixelResult`` each."""
        ...

    def segment_batch(
        self, images: list[np.ndarray], expression: str, *, hd_num: int = 9, max_new_tokens: int = 64
    ) -> list[Any]:
        """Referring segmentation of (H, W, 3) uint8 images, one ``GeoPixelResult`` each."""
        ...


def resolve_model(model: str | None, command: str) -> str:
    """The model to load: ``--model``, else ``$GEOPIXEL_MODEL``, else the released model for the command.

    Args:
        model: The ``--model`` value, or None.
        command: ``"describe"`` or ``"segment"``.

    Returns:
        A local directory or a hub id.
    """
    return model or os.environ.get(MODEL_ENV) or DEFAULT_MODELS[command]


def check_model_dir(path: Path) -> None:
    """Refuse a model directory that cannot hold a checkpoint, before torch is imported.

    Args:
        path: A local directory.

    Raises:
        UserError: When ``config.json``, ``tokenizer.model`` or the weights are missing.
    """
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        missing.append(f"weights ({' or '.join(WEIGHT_PATTERNS)})")
    if missing:
        raise UserError(f"model directory {path} is incomplete: missing {', '.join(missing)}")


def locate_model(model: str) -> str:
    """Check a local ``--model`` directory; pass a hub id through.

    A hub id (``owner/name``) is resolved by ``geopixel.checkpoint.resolve_checkpoint`` when the
    model loads (local cache first; offline and not cached: an error that says how to download
    it), so the CLI keeps no second copy of that logic.

    Args:
        model: A directory or hub id (``owner/name``).

    Returns:
        The local directory, or the hub id.

    Raises:
        UserError: Missing or incomplete directory.
    """
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        if not path.is_dir():
            raise UserError(f"model directory not found: {model}")
        check_model_dir(path)
        return str(path)
    return model


def load_model(model: str, *, device: str | None, dtype: str | None) -> SceneModel:
    """Load GeoPixel (imports torch and ``geopixel`` here, not at CLI import).

    Args:
        model: A directory or hub id (see :func:`locate_model`).
        device: ``"cuda"``, ``"cpu"``, ``"mps"`` or None (automatic).
        dtype: ``"bf16"``, ``"fp16"``, ``"fp32"`` or None (automatic).

    Returns:
        The loaded network.

    Raises:
        UserError: Anything that prevents loading, in one line.
    """
    location = locate_model(model)
    try:
        import sentencepiece

        # The InternLM2 tokenizer model makes sentencepiece log a harmless warning about piece 354
        # on stderr at every load; a GIS user's terminal should not show it (CLI-level setting).
        sentencepiece.set_min_log_level(2)
        from geopixel import GeoPixel
    except ImportError as exc:
        raise UserError(f"the geopixel network package cannot be imported: {exc}") from exc
    try:
        loaded: SceneModel = GeoPixel.from_pretrained(location, device=device, dtype=dtype)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load model {model}: {first}") from exc
    return loaded
