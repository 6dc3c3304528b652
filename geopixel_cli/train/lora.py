"""Which parameters train (ARCHITECTURE.md §1.6), and the LoRA adapters on the LLM linears.

The reference wraps the LLM with PEFT LoRA (r 8, α 16, dropout 0.05, targets ``wqkv``, ``wo``,
``w1``, ``w2``, ``w3``), acting on **all** tokens, on top of the frozen Partial-LoRA of IXC-2.5.
PEFT cannot wrap our :class:`~geopixel.llm.PLoRALinear` (it dispatches on ``nn.Linear`` and our
forward takes the image mask), so the adapter is a small module of our own with PEFT's math and
init: ``y = PLoRA(x) + (α/r)·B(A(dropout(x)))``, A Kaiming-uniform(√5), B zeros. The adapter
parameters are named ``<linear>.lora_A.weight`` / ``<linear>.lora_B.weight`` and are folded into
the main ``weight`` by :func:`merge_lora` (W ← W + (α/r)·B·A, what ``merge_and_unload`` does).

Trainable set (§1.6): LoRA adapters; ``tok_embeddings`` and ``output`` fully; ``vision_proj`` and
the two GN separator tokens (trained by the reference, the GN tokens by accident of a name
filter) when ``train_projector``; ``text_hidden_fcs``; the SAM-2 mask decoder except
``conv_s0``/``conv_s1`` (run under ``no_grad`` in the reference, so never updated). Frozen: CLIP,
the SAM-2 image encoder and prompt encoder, RMSNorms, the Partial-LoRA weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from geopixel.llm import PLoRALinear
from torch import Tensor, nn

LORA_TARGETS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


@dataclass(frozen=True)
class LoraSpec:
    """PEFT LoRA hyper-parameters of train.sh."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05

    @property
    def scaling(self) -> float:
        """Alpha / r."""
        return self.alpha / self.r


class LoraPLoRALinear(PLoRALinear):
    """A :class:`PLoRALinear` with an extra all-token LoRA adapter (built by :func:`add_lora`)."""

    lora_A: nn.Linear
    lora_B: nn.Linear
    lora_drop: nn.Dropout
    lora_scaling: float

    def forward(self, x: Tensor, im_mask: Tensor | None = None) -> Tensor:
        """Partial-LoRA output plus ``scaling · B(A(dropout(x)))`` on every row: (B, T, in) → (B, T, out)."""
        y = super().forward(x, im_mask)
        return y + self.lora_B(self.lora_A(self.lora_drop(x))) * self.lora_scaling


def _targets(model: nn.Module) -> list[tuple[str, PLoRALinear]]:
    out = []
    for name, module in model.llm.named_modules():
        if isinstance(module, PLoRALinear) and name.endswith(LORA_TARGETS):
            out.append((name, module))
    return out


def add_lora(model: nn.Module, spec: LoraSpec) -> int:
    """Attach LoRA adapters to the five linears of every decoder layer.

    Args:
        model: A :class:`~geopixel.modeling.GeoPixel`.
        spec: Rank, alpha, dropout.

    Returns:
        Number of wrapped linears.
    """
    targets = _targets(model)
    for _, module in targets:
        out_f, in_f = module.weight.shape
        dev, dtype = module.weight.device, module.weight.dtype
        module.__class__ = LoraPLoRALinear
        module.lora_A = nn.Linear(in_f, spec.r, bias=False, device=dev, dtype=dtype)
        module.lora_B = nn.Linear(spec.r, out_f, bias=False, device=dev, dtype=dtype)
        nn.init.kaiming_uniform_(module.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(module.lora_B.weight)
        module.lora_drop = nn.Dropout(spec.dropout)
        module.lora_scaling = spec.scaling
    return len(targets)


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its main weight and remove it (PEFT ``merge_and_unload``).

    Returns:
        Number of merged linears.
    """
    merged = 0
    for module in model.llm.modules():
        if isinstance(module, LoraPLoRALinear):
            delta = module.lora_B.weight.float() @ module.lora_A.weight.float() * module.lora_scaling
            module.weight.copy_((module.weight.float() + delta).to(module.weight.dtype))
            for attr in ("lora_A", "lora_B", "lora_drop"):
                delattr(module, attr)
            module.__class__ = PLoRALinear
            merged += 1
    return merged


def set_trainable(model: nn.Module, *, train_projector: bool = True) -> list[str]:
    """Apply the §1.6 trainable set (call after :func:`add_lora`).

    Args:
        model: A :class:`~geopixel.modeling.GeoPixel`.
        train_projector: Also train ``vision_proj`` and the GN separator tokens.

    Returns:
        Names of the trainable parameters.
    """
    model.requires_grad_(False)
    names = []
    for name, param in model.named_parameters():
        train = (
            ".lora_A." in name
            or ".lora_B." in name
            or name in ("llm.tok_embeddings.weight", "llm.output.weight")
            or name.startswith("grounding.text_hidden_fcs.")
            or (name.startswith("grounding.mask_decoder.") and ".conv_s" not in name)
            or (train_projector and name.startswith(("vision.vision_proj.", "vision.plora_")))
        )
        param.requires_grad_(train)
        if train:
            names.append(name)
    return names


def set_frozen_eval(model: nn.Module) -> None:
    """Train mode for the model, eval mode for the frozen encoders (no dropout there anyway)."""
    model.train()
    model.vision.vit.eval()
    model.grounding.image_encoder.eval()
