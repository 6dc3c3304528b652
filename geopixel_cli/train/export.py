"""Export a trained model as a checkpoint directory in the released layout (what ``--model`` loads).

What the reference's ``merge.py`` produces (ARCHITECTURE.md §1.5): LoRA deltas folded into the
main ``wqkv/wo/w1/w2/w3`` weights, the plain model's keys under their released names (no
``lora_A/B``, no ``base_model.model.`` prefix), plus ``config.json`` and the tokenizer files.
Keys our modules never build (the ``lora_sft/dpo/web`` adapters and SAM-2's video-memory parts)
are copied unchanged from the source checkpoint when it has them, so the directory also loads in
the reference code; otherwise they are omitted (our loader does not need them).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from geopixel.checkpoint import (
    expected_released_keys,
    open_checkpoint,
    released_to_ours,
    unused_released_keys,
)
from safetensors.torch import save_file
from torch import nn

CARRIED_FILES = (
    "config.json",
    "tiny_dims.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def released_state_dict(model: nn.Module, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our state dict under the released key names (LoRA must be merged first).

    Args:
        model: A :class:`~geopixel.modeling.GeoPixel` without LoRA adapters.
        dtype: Cast floating tensors to this dtype (None keeps each tensor's dtype).

    Returns:
        Released name → tensor (contiguous, on CPU).

    Raises:
        ValueError: A parameter has no released name (e.g. unmerged LoRA adapters).
    """
    ours = model.state_dict()
    reverse: dict[str, str] = {}
    for name in expected_released_keys(model.config):
        target = released_to_ours(name)
        if target is not None:
            reverse[target] = name
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for name, tensor in ours.items():
        if name not in reverse:
            unmapped.append(name)
            continue
        t = tensor.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[reverse[name]] = t.to("cpu").contiguous()
    if unmapped:
        raise ValueError(f"parameters without a released name (merge LoRA first?): {', '.join(unmapped[:8])}")
    return out


def _carry_unused(source: Path | None, model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    if source is None:
        return 0
    try:
        lazies = open_checkpoint(source)
    except FileNotFoundError:
        return 0
    wanted = unused_released_keys(model.config)
    n = 0
    for name, shape in wanted.items():
        lazy = lazies.get(name)
        if lazy is not None and tuple(lazy.shape) == tuple(shape):
            state[name] = lazy.load().contiguous()
            n += 1
    return n


def export_checkpoint(
    model: nn.Module, output: Path, *, source: Path | None, dtype: torch.dtype | None = None
) -> Path:
    """Write ``model.safetensors`` + config + tokenizer files into ``output``.

    Args:
        model: Trained model with LoRA merged (see :func:`geopixel_cli.train.lora.merge_lora`).
        output: Target directory (created; existing files are overwritten).
        source: The checkpoint directory training started from (config, tokenizer and the
            never-used tensors are carried over from it).
        dtype: Dtype of the written weights (None keeps the training dtype).

    Returns:
        ``output``.
    """
    output.mkdir(parents=True, exist_ok=True)
    state = released_state_dict(model, dtype=dtype)
    _carry_unused(source, model, state)
    save_file(state, str(output / "model.safetensors"), metadata={"format": "pt"})
    if source is not None:
        for name in CARRIED_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, output / name)
    _update_config(output, model, dtype or next(iter(state.values())).dtype)
    return output


def _update_config(output: Path, model: nn.Module, dtype: torch.dtype) -> None:
    """Make ``config.json`` / ``added_tokens.json`` describe the written weights (e.g. after a base start)."""
    cfg = model.config
    cfg_path = output / "config.json"
    raw = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    raw.update(
        torch_dtype=_DTYPE_NAMES.get(dtype, str(dtype)),
        vocab_size=cfg.llm.vocab_size,
        out_dim=cfg.grounding.out_dim,
        architectures=["GeoPixelForCausalLM"],
    )
    cfg_path.write_text(json.dumps(raw, indent=2) + "\n")
    tokens = output / "added_tokens.json"
    if not tokens.is_file() and model.tokenizer is not None:
        tokens.write_text(json.dumps(model.tokenizer.added_tokens))
