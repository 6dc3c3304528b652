"""Pixel grounding: [SEG] hidden states → SAM-2 masks (ARCHITECTURE.md §8.2–8.5).

SAM-2 2.0 (Hiera trunk + FPN neck, prompt-encoder PE, mask decoder) comes from transformers'
own implementation (``transformers.models.sam2``); this module configures it from
:class:`~geopixel.config.GroundingConfig`, adds ``no_mem_embed`` and the ``text_hidden_fcs``
projection, and composes them the way GeoPixel does (the official ``SAM2ImagePredictor`` path
with one text token per mask instead of points). Released weights load through
:mod:`geopixel.sam2_names`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.sam2.configuration_sam2 import (
    Sam2HieraDetConfig,
    Sam2MaskDecoderConfig,
    Sam2PromptEncoderConfig,
    Sam2VisionConfig,
)
from transformers.models.sam2.modeling_sam2 import (
    Sam2MaskDecoder,
    Sam2MultiScaleAttention,
    Sam2PositionalEmbedding,
    Sam2VisionModel,
    do_pool,
)

from geopixel.config import GroundingConfig
from geopixel.sam2_names import convert_grounding_state_dict, hiera_stage_dims

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BACKBONE_STRIDE = 16  # 1024 px → 64×64 image embedding
_NUM_MASK_TOKENS = 4  # token 0 = single mask, 1..3 = multimask outputs


@dataclass
class ImageFeatures:
    """SAM-2 image features of a batch (what ``SAM2ImagePredictor.set_image`` keeps).

    Attributes:
        image_embed: (B, d, 64, 64) lowest kept FPN level + ``no_mem_embed``.
        high_res: ((B, d/8, 256, 256), (B, d/4, 128, 128)) after ``conv_s0`` / ``conv_s1``.
    """

    image_embed: Tensor
    high_res: tuple[Tensor, Tensor]


class DecoderOutput(NamedTuple):
    """All four mask-decoder outputs for n prompts on one image.

    Attributes:
        low_res: (n, 4, 256, 256) mask logits, token 0 first.
        iou: (n, 4) predicted IoUs (sigmoid).
        object_score: (n, 1) object-score logits (unused by GeoPixel).
    """

    low_res: Tensor
    iou: Tensor
    object_score: Tensor


class MaskOutput(NamedTuple):
    """Selected masks for n prompts on one image.

    Attributes:
        mask_logits: (n, H, W) float32 logits at the original size; mask = logits > 0.
        low_res: (n, 1, 256, 256) selected low-resolution logits.
        iou: (n,) predicted IoU of the selected token.
    """

    mask_logits: Tensor
    low_res: Tensor
    iou: Tensor


class Grounding(nn.Module):
    """SAM-2 image encoder + mask decoder prompted by projected [SEG] hidden states.

    Args:
        cfg: SAM-2 sizes.
        hidden_size: LLM width (input of ``text_hidden_fcs``).
    """

    def __init__(self, cfg: GroundingConfig, *, hidden_size: int) -> None:
        super().__init__()
        vision_cfg, prompt_cfg, decoder_cfg = sam2_configs(cfg)
        self.cfg = cfg
        self.image_encoder = Sam2VisionModel(vision_cfg)
        _use_sdpa_hiera_attention(self.image_encoder)
        self.mask_decoder = Sam2MaskDecoder(decoder_cfg)
        self.pe_layer = Sam2PositionalEmbedding(prompt_cfg)
        self.no_mask_embed = nn.Embedding(1, cfg.d_model)
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        text_fc = [
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_size, cfg.out_dim),
            nn.Dropout(0.0),
        ]
        self.text_hidden_fcs = nn.ModuleList([nn.Sequential(*text_fc)])

    def load_released(self, released: dict[str, Tensor]) -> None:
        """Load released ``model.visual_model.*`` + ``model.text_hidden_fcs.*`` tensors (strict).

        Args:
            released: Those tensors under their full checkpoint names (other families raise).
        """
        self.load_state_dict(convert_grounding_state_dict(released), strict=True)

    @property
    def embed_hw(self) -> int:
        """Side of the image embedding (64)."""
        return self.cfg.image_size // _BACKBONE_STRIDE

    def preprocess(self, images: list[np.ndarray], *, device: torch.device | None = None) -> Tensor:
        """``SAM2Transforms``: ToTensor → resize to exactly 1024² (bilinear, antialias) → ImageNet norm.

        The reference resizes with torchvision's tensor ``Resize`` (antialias=True), which is
        ``F.interpolate(mode='bilinear', antialias=True, align_corners=False)``; the aspect
        ratio is not kept.

        Args:
            images: RGB uint8 arrays (H, W, 3), sizes may differ.
            device: Where to resize (default CPU).

        Returns:
            (B, 3, 1024, 1024) float32.
        """
        size = self.cfg.image_size
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
        out = []
        for img in images:
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {img.shape} {img.dtype}")
            x = torch.from_numpy(np.ascontiguousarray(img)).to(device).permute(2, 0, 1).float() / 255.0
            x = F.interpolate(
                x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
            out.append((x[0] - mean) / std)  # (3, 1024, 1024)
        return torch.stack(out)

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> ImageFeatures:
        """Hiera + FPN (scalp 1), high-res projections, ``no_mem_embed`` (§8.3).

        Runs without gradients: the reference keeps the image encoder frozen and calls
        ``conv_s0``/``conv_s1`` under ``no_grad`` too (ARCHITECTURE.md §1.6).

        Args:
            pixels: (B, 3, 1024, 1024) from :meth:`preprocess`.

        Returns:
            The features of the batch.
        """
        dtype = self.no_mem_embed.dtype
        fpn = self.image_encoder(pixels.to(dtype)).fpn_hidden_states  # high → low resolution
        s0 = self.mask_decoder.conv_s0(fpn[0])  # (B, d/8, 256, 256)
        s1 = self.mask_decoder.conv_s1(fpn[1])  # (B, d/4, 128, 128)
        image_embed = fpn[2] + self.no_mem_embed.view(1, -1, 1, 1)  # (B, d, 64, 64)
        return ImageFeatures(image_embed=image_embed, high_res=(s0, s1))

    def project_seg(self, hidden: Tensor) -> Tensor:
        """``text_hidden_fcs``: (N, C) final-normed [SEG] hidden states → (N, out_dim) prompts."""
        return self.text_hidden_fcs[0](hidden)

    def dense_pe(self) -> Tensor:
        """``get_dense_pe()``: random-Fourier PE of the 64×64 cell centres, (1, d, 64, 64)."""
        n = self.embed_hw
        pe_matrix = self.pe_layer.positional_embedding
        centres = (torch.arange(n, device=pe_matrix.device, dtype=pe_matrix.dtype) + 0.5) / n
        y, x = torch.meshgrid(centres, centres, indexing="ij")
        pe = self.pe_layer(torch.stack([x, y], dim=-1))  # (64, 64, d)
        return pe.permute(2, 0, 1)[None]

    def predict_masks(self, features: ImageFeatures, prompts: Tensor, *, index: int = 0) -> DecoderOutput:
        """Mask decoder on one image for n text prompts: all 4 mask tokens (SAM-2 ``predict_masks``).

        The image embedding is rounded to bfloat16 first: the reference casts it to bf16 right
        before the decoder even in an fp32 model (golden README §7.9), and the sum with the fp32
        dense prompt brings it back to fp32. In an all-bf16 model this is a no-op.

        Args:
            features: Output of :meth:`encode_images`.
            prompts: (n, out_dim) projected [SEG] embeddings (sparse prompts, one token each).
            index: Which image of the batch.

        Returns:
            Low-res logits, IoUs and object scores of all tokens.
        """
        dec = self.mask_decoder
        dtype = dec.iou_token.weight.dtype
        n, d, hw = prompts.shape[0], self.cfg.d_model, self.embed_hw
        embed = features.image_embed[index : index + 1].to(torch.bfloat16).to(dtype)  # (1, d, 64, 64)
        s0, s1 = (f[index : index + 1] for f in features.high_res)
        output_tokens = torch.cat([dec.obj_score_token.weight, dec.iou_token.weight, dec.mask_tokens.weight])
        tokens = torch.cat([output_tokens.expand(n, -1, -1), prompts.to(dtype)[:, None]], dim=1)  # (n, 7, d)
        src = (embed + self.no_mask_embed.weight.view(1, d, 1, 1)).expand(n, -1, -1, -1)  # (n, d, 64, 64)
        pos = self.dense_pe().to(dtype).expand(n, -1, -1, -1)
        hs, keys = dec.transformer(
            point_embeddings=tokens[:, None],
            image_embeddings=src,
            image_positional_embeddings=pos,
            attention_similarity=None,
        )  # (n, 1, 7, d), (n, 1, 64·64, d)
        hs, keys = hs[:, 0], keys[:, 0]
        src = keys.transpose(1, 2).reshape(n, d, hw, hw)
        up = dec.activation(dec.upscale_layer_norm(dec.upscale_conv1(src) + s1))  # (n, d/4, 128, 128)
        up = dec.activation(dec.upscale_conv2(up) + s0)  # (n, d/8, 256, 256)
        hyper = torch.stack(
            [mlp(hs[:, 2 + i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1
        )  # (n, 4, d/8)
        low_res = (hyper @ up.flatten(2)).view(n, _NUM_MASK_TOKENS, *up.shape[-2:])  # (n, 4, 256, 256)
        return DecoderOutput(low_res, dec.iou_prediction_head(hs[:, 1]), dec.pred_obj_score_head(hs[:, 0]))

    def decode_masks(
        self,
        features: ImageFeatures,
        prompts: Tensor,
        *,
        orig_hw: tuple[int, int],
        index: int = 0,
        multimask_stability: bool = True,
    ) -> MaskOutput:
        """Masks for n [SEG] prompts on one image, upsampled to its original size (§8.4–8.5).

        Token choice: in train mode always token 0 (what the losses use); in eval mode, with
        ``multimask_stability`` (the reference's setting), token 0 unless its stability is below
        the threshold, then the best of tokens 1..3 by predicted IoU.

        Args:
            features: Output of :meth:`encode_images`.
            prompts: (n, out_dim) projected [SEG] embeddings.
            orig_hw: (H, W) of the original image.
            index: Which image of the batch.
            multimask_stability: Use the dynamic multimask fallback in eval mode.

        Returns:
            Full-size logits, selected low-res logits and IoUs.
        """
        if prompts.shape[0] == 0:  # no [SEG]: nothing to decode
            side = 4 * self.embed_hw
            empty = features.image_embed.new_zeros((0, 1, side, side))
            return MaskOutput(
                empty.new_zeros((0, *orig_hw), dtype=torch.float32), empty, empty.new_zeros((0,))
            )
        out = self.predict_masks(features, prompts, index=index)
        dynamic = multimask_stability and not self.training
        token = select_mask_tokens(
            out.low_res,
            out.iou,
            dynamic=dynamic,
            delta=self.cfg.stability_delta,
            thresh=self.cfg.stability_thresh,
        )  # (n,)
        rows = torch.arange(token.shape[0], device=token.device)
        low_res = out.low_res[rows, token][:, None]  # (n, 1, 256, 256)
        logits = F.interpolate(low_res.float(), size=orig_hw, mode="bilinear", align_corners=False)
        return MaskOutput(logits[:, 0], low_res, out.iou[rows, token])


def stability_scores(mask_logits: Tensor, *, delta: float) -> Tensor:
    """#(logit > delta) / #(logit > −delta) per mask (1.0 when the denominator is 0): (n, ...) → (n,)."""
    flat = mask_logits.flatten(1)
    area_i = (flat > delta).sum(-1).float()
    area_u = (flat > -delta).sum(-1).float()
    return torch.where(area_u > 0, area_i / area_u.clamp(min=1), torch.ones_like(area_u))


def select_mask_tokens(low_res: Tensor, iou: Tensor, *, dynamic: bool, delta: float, thresh: float) -> Tensor:
    """SAM-2's dynamic multimask-via-stability choice for ``multimask_output=False``.

    Args:
        low_res: (n, 4, h, w) logits of all tokens.
        iou: (n, 4) predicted IoUs.
        dynamic: Apply the fallback (eval mode); otherwise always token 0.
        delta: Stability threshold offset (0.05).
        thresh: Minimum stability of token 0 (0.98).

    Returns:
        (n,) chosen token per prompt (0..3).
    """
    zero = torch.zeros(low_res.shape[0], dtype=torch.long, device=low_res.device)
    if not dynamic:
        return zero
    best_multi = iou[:, 1:].argmax(dim=-1) + 1
    stable = stability_scores(low_res[:, 0], delta=delta) >= thresh
    return torch.where(stable, zero, best_multi)


def sam2_configs(
    cfg: GroundingConfig,
) -> tuple[Sam2VisionConfig, Sam2PromptEncoderConfig, Sam2MaskDecoderConfig]:
    """Transformers' SAM-2 configs for SAM 2.0 Hiera (``sam2_hiera_*.yaml`` + ``build_sam2`` overrides).

    Args:
        cfg: Our grounding sizes.

    Returns:
        Vision (Hiera + FPN neck), prompt-encoder and mask-decoder configs.
    """
    dims = hiera_stage_dims(cfg)
    if list(cfg.backbone_channel_list) != dims[::-1]:
        raise ValueError(
            f"backbone_channel_list {cfg.backbone_channel_list} != Hiera stage widths {dims[::-1]}"
        )
    hiera = Sam2HieraDetConfig(
        hidden_size=cfg.hiera_embed_dim,
        num_attention_heads=cfg.hiera_num_heads,
        image_size=[cfg.image_size, cfg.image_size],
        window_positional_embedding_background_size=list(cfg.hiera_window_pos_embed_bkg),
        blocks_per_stage=list(cfg.hiera_stages),
        embed_dim_per_stage=dims,
        num_attention_heads_per_stage=[cfg.hiera_num_heads * 2**i for i in range(len(dims))],
        window_size_per_stage=list(cfg.hiera_window_spec),
        global_attention_blocks=list(cfg.hiera_global_att_blocks),
    )
    sizes = [[cfg.image_size // s] * 2 for s in (4, 8, 16)]
    vision = Sam2VisionConfig(
        backbone_config=hiera,
        backbone_channel_list=list(cfg.backbone_channel_list),
        backbone_feature_sizes=sizes,
        fpn_hidden_size=cfg.d_model,
        fpn_top_down_levels=[2, 3],
        num_feature_levels=3,
    )
    prompt = Sam2PromptEncoderConfig(
        hidden_size=cfg.d_model, image_size=cfg.image_size, patch_size=_BACKBONE_STRIDE
    )
    decoder = Sam2MaskDecoderConfig(
        hidden_size=cfg.d_model,
        mlp_dim=cfg.mlp_dim,
        iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        dynamic_multimask_via_stability=True,
        dynamic_multimask_stability_delta=cfg.stability_delta,
        dynamic_multimask_stability_thresh=cfg.stability_thresh,
    )
    decoder._attn_implementation = "sdpa"
    return vision, prompt, decoder


class _SdpaMultiScaleAttention(Sam2MultiScaleAttention):
    """Hiera attention through ``F.scaled_dot_product_attention``, same weights and math.

    transformers 5.23's ``Sam2MultiScaleAttention.forward`` also materialises a full
    softmax(QKᵀ) it never uses; for the global blocks at 64×64 that is heads × 4096² floats
    per image. This forward drops it.
    """

    def forward(self, hidden_states: Tensor, **kwargs: object) -> Tensor:  # noqa: D102
        b, h, w, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(b, h * w, 3, self.num_attention_heads, -1)
        q, k, v = torch.unbind(qkv, 2)  # (B, HW, nh, hs)
        if self.query_stride:
            q = do_pool(q.reshape(b, h, w, -1), self.query_stride)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_attention_heads, -1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))  # (B, H', W', dim_out)


def _use_sdpa_hiera_attention(encoder: Sam2VisionModel) -> None:
    for module in encoder.modules():
        if type(module) is Sam2MultiScaleAttention:
            module.__class__ = _SdpaMultiScaleAttention
