"""Start training from base weights, as the paper does: InternLM-XComposer-2.5 + SAM-2 (Hiera-L).

Files (ARCHITECTURE.md §9.2, train.sh):

* ``--model IXC_DIR``: the ``internlm/internlm-xcomposer2d5-7b`` directory (``config.json``, its
  weight shards, ``tokenizer.model``). Its state dict uses the names GeoPixel inherits
  (``model.tok_embeddings``, ``model.layers.*`` with Partial-LoRA, ``output``, ``vit.*``,
  ``vision_proj.*``, ``plora_*_GN``); its vocabulary has 92,544 rows.
* ``--sam2 FILE``: ``sam2_hiera_large.pt`` of ``facebook/sam2-hiera-large`` (a ``{"model": state
  dict}`` pickle in facebookresearch naming); its keys become ``model.visual_model.*``.

What happens (train.py): the tokenizer gets the six chat tokens and ``[SEG]``, ``<p>``, ``</p>``
(ids 92544..92552), the embedding and output matrices are resized to 92,553 rows — new rows drawn
from N(0, 0.02²) like HF's ``resize_token_embeddings`` — and ``text_hidden_fcs`` starts from
PyTorch's default init (``is_pretrained False``). The SAM-2 video-memory tensors are accepted and
ignored. Everything else must match exactly (missing or misshaped tensors raise).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from geopixel.checkpoint import (
    CheckpointError,
    LazyTensor,
    materialize_buffers,
    open_checkpoint,
    parse_dtype,
    released_to_ours,
    unused_released_keys,
)
from geopixel.config import GeoPixelConfig
from geopixel.tokenizer import FALLBACK_ADDED_TOKENS, GeoPixelTokenizer
from torch import nn

SAM2_PREFIX = "model.visual_model."
RESIZED = ("llm.tok_embeddings.weight", "llm.output.weight")


def _sam2_tensors(path: Path) -> dict[str, LazyTensor]:
    if not path.is_file():
        raise FileNotFoundError(f"--sam2 {path}: file not found (expected sam2_hiera_large.pt)")
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    state = state.get("model", state)
    return {SAM2_PREFIX + k: LazyTensor(tuple(v.shape), v.dtype, _constant(v)) for k, v in state.items()}


def _constant(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: tensor


def base_config(ixc_dir: Path) -> GeoPixelConfig:
    """GeoPixel configuration for an IXC-2.5 directory (vocabulary grown by the 9 added tokens)."""
    raw = json.loads((ixc_dir / "config.json").read_text())
    dims = (
        json.loads((ixc_dir / "tiny_dims.json").read_text()) if (ixc_dir / "tiny_dims.json").is_file() else {}
    )
    raw["vocab_size"] = max(int(raw.get("vocab_size", 92544)), max(FALLBACK_ADDED_TOKENS.values()) + 1)
    return GeoPixelConfig.from_dicts(raw, dims, dict(FALLBACK_ADDED_TOKENS), name=ixc_dir.name)


def _resize(tensor: torch.Tensor, rows: int, generator: torch.Generator) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    extra = torch.randn(rows - tensor.shape[0], tensor.shape[1], generator=generator) * 0.02
    return torch.cat([tensor.float(), extra]).to(tensor.dtype)


def _fresh_text_fcs(config: GeoPixelConfig, seed: int) -> dict[str, torch.Tensor]:
    """PyTorch-default-initialised ``text_hidden_fcs`` (Linear, ReLU, Linear, Dropout(0))."""
    torch.manual_seed(seed)
    hidden, out = config.llm.hidden_size, config.grounding.out_dim
    fcs = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out), nn.Dropout(0.0))
    return {f"grounding.text_hidden_fcs.0.{k}": v.detach() for k, v in fcs.state_dict().items()}


def load_base_model(
    ixc_dir: Path, sam2_file: Path, *, device: torch.device, dtype: str | torch.dtype | None, seed: int = 0
) -> nn.Module:
    """Build GeoPixel from IXC-2.5 + SAM-2 weights with a fresh ``text_hidden_fcs``.

    Args:
        ixc_dir: InternLM-XComposer-2.5 checkpoint directory.
        sam2_file: SAM-2 Hiera checkpoint (``.pt``).
        device: Target device.
        dtype: Weight dtype (``bf16``/``fp32``...; None = bf16 on GPU, fp32 on CPU).
        seed: Seed of the new embedding rows and of ``text_hidden_fcs``.

    Returns:
        The model (eval mode) with its tokenizer.

    Raises:
        CheckpointError: Missing, unexpected or wrongly shaped tensors (listed).
    """
    from geopixel.modeling import GeoPixel

    config = base_config(ixc_dir)
    want = parse_dtype(dtype, device)
    tokenizer = GeoPixelTokenizer.from_file(ixc_dir / "tokenizer.model")
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = GeoPixel(config, tokenizer=tokenizer)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    released = {**open_checkpoint(ixc_dir), **_sam2_tensors(sam2_file)}
    skip = unused_released_keys(config)
    state: dict[str, torch.Tensor] = {}
    unexpected, bad = [], []
    for name, lazy in released.items():
        if name in skip:
            continue
        ours = released_to_ours(name)
        if ours is None or ours not in expected:
            unexpected.append(name)
            continue
        tensor = lazy.load()
        if ours in RESIZED:
            tensor = _resize(tensor, expected[ours][0], gen)
        if tuple(tensor.shape) != expected[ours]:
            bad.append(f"{name}: {list(tensor.shape)} vs {list(expected[ours])}")
            continue
        state[ours] = tensor
    state.update(_fresh_text_fcs(config, seed))
    missing = sorted(k for k in expected if k not in state)
    if missing or unexpected or bad:
        raise CheckpointError(
            f"base weights ({ixc_dir}, {sam2_file}) do not match the model: missing {missing[:8]}, "
            f"unexpected {sorted(unexpected)[:8]}, wrong shape {bad[:8]}"
        )
    state = {
        k: v.to(device=device, dtype=want if v.is_floating_point() else v.dtype) for k, v in state.items()
    }
    model.load_state_dict(state, strict=True, assign=True)
    materialize_buffers(model, device=device)
    return model.eval()
