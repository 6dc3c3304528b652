"""Random-weight checkpoint directories of other (small) sizes, for from-scratch demos and benchmarks.

The golden fixture (``../shared/golden/reference-tiny``) fixes one tiny size, chosen to check
parity: its SAM-2 mask decoder is 16 wide, so the final mask features have 16 / 8 = 2 channels
and every mask is a per-pixel combination of just two feature maps. That is too small to *learn*
much (docs/TRAINING.md). :func:`write_random_checkpoint` writes a directory in the released layout
(``config.json``, ``tiny_dims.json``, ``model.safetensors``, tokenizer files) of the same network
code at other sizes, starting from a template directory's files and overriding some sizes. It
loads through ``GeoPixel.from_pretrained`` / ``--model`` like any released checkpoint.

Initialisation follows the reference's families: InternLM2 linears and embeddings N(0, 0.02²)
(``initializer_range``), Partial-LoRA B zero; SAM-2's image encoder with PyTorch's default layer
initialisation, as the ``sam2`` package builds it (see :func:`init_default_`); CLIP from
transformers' ``post_init``; the mask decoder, prompt parts, projector and ``text_hidden_fcs``
with PyTorch's defaults.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

# A small size that can learn on CPU in minutes (benchmarks/bench_training.py, docs/TRAINING.md):
# * LLM and SAM-2 width 64: 8-channel mask features instead of the golden fixture's 2;
# * initializer_range 0.16 = 0.02·sqrt(4096/64): InternLM2's 0.02 is tuned to width 4096, where a
#   query or key entry has std ~1.3; at width 64 it gives attention scores of ~0.1, i.e. uniform
#   attention whose query/key gradients start at a saddle, and the [SEG] token never learns to
#   read its phrase;
# * CLIP tile 224 px (8x8 merged tokens per crop instead of 20x20): ~150 image tokens instead of
#   ~840 for one crop + the global view, fewer distractors for the [SEG] token and cheaper steps.
# CLIP and the Hiera trunk keep the golden fixture's widths.
SMALL_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "initializer_range": 0.16,
    "out_dim": 64,
}
SMALL_DIMS: dict[str, Any] = {
    "clip": {"image_size": 224},
    "mm_mid_hidden_size": 64,
    "out_dim": 64,
    "sam2": {"d_model": 64, "sam_mlp_dim": 128, "sam_iou_head_hidden_dim": 64},
}
SIZES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {"small": (SMALL_CONFIG, SMALL_DIMS)}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@torch.no_grad()
def init_llm_(llm: nn.Module, *, std: float = 0.02) -> None:
    """InternLM2's ``_init_weights``: linears and embeddings N(0, std²), biases zero, PLoRA B zero.

    Args:
        llm: :class:`geopixel.llm.InternLM2` (its ``PLoRALinear.weight`` is allocated uninitialised).
        std: ``initializer_range``.
    """
    from geopixel.llm import PLoRALinear, RMSNorm

    for module in llm.modules():
        if isinstance(module, PLoRALinear):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.Linear | nn.Embedding):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
    for module in llm.modules():
        if isinstance(module, PLoRALinear):
            module.Plora_B.weight.zero_()


@torch.no_grad()
def init_default_(module: nn.Module) -> None:
    """PyTorch's default layer initialisation (what the ``sam2`` package's modules get when built).

    transformers' ``post_init`` draws SAM-2's linears and convolutions from N(0, 0.02²), which
    leaves a random Hiera + FPN with image embeddings about 100 times smaller (std ~0.02) than the
    ``sam2`` package's own random construction (std ~2.5 in the golden fixture): the frozen
    features then carry almost no signal next to the decoder's no-mask embedding.

    Args:
        module: Module whose linears, convolutions and layer norms are reset.
    """
    for sub in module.modules():
        if isinstance(sub, nn.Linear | nn.Conv2d | nn.LayerNorm):
            sub.reset_parameters()


def write_random_checkpoint(
    output: Path,
    *,
    template: Path,
    config_overrides: dict[str, Any],
    dims_overrides: dict[str, Any],
    seed: int = 0,
) -> Path:
    """Write a random-weight checkpoint directory of the given sizes.

    Args:
        output: Target directory (created; must not exist or be empty).
        template: A checkpoint directory with ``config.json``, ``tiny_dims.json`` and the tokenizer
            files (e.g. the golden ``reference-tiny``); its weights are not read.
        config_overrides: Keys replaced in ``config.json`` (InternLM2 names, plus ``out_dim``).
        dims_overrides: Keys replaced (recursively) in ``tiny_dims.json``.
        seed: Seed of the initialisation.

    Returns:
        ``output``.

    Raises:
        FileExistsError: ``output`` exists and is not empty.
        FileNotFoundError: The template lacks ``config.json`` or ``tiny_dims.json``.
    """
    from geopixel.config import GeoPixelConfig
    from geopixel.modeling import GeoPixel
    from geopixel.tokenizer import GeoPixelTokenizer

    from geopixel_cli.train.export import CARRIED_FILES, export_checkpoint

    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty")
    for name in ("config.json", "tiny_dims.json"):
        if not (template / name).is_file():
            raise FileNotFoundError(f"template {template} has no {name}")
    output.mkdir(parents=True, exist_ok=True)
    raw = _merge(json.loads((template / "config.json").read_text()), config_overrides)
    dims = _merge(json.loads((template / "tiny_dims.json").read_text()), dims_overrides)
    (output / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    (output / "tiny_dims.json").write_text(json.dumps(dims, indent=2) + "\n")
    for name in CARRIED_FILES:  # the tokenizer files (config and sizes were written above)
        if name not in ("config.json", "tiny_dims.json") and (template / name).is_file():
            shutil.copyfile(template / name, output / name)
    config = GeoPixelConfig.from_dir(output)
    torch.manual_seed(seed)
    model = GeoPixel(config, tokenizer=GeoPixelTokenizer.from_dir(output))
    init_llm_(model.llm, std=float(raw.get("initializer_range", 0.02)))
    init_default_(model.grounding.image_encoder)
    return export_checkpoint(model, output, source=None, dtype=torch.float32)
