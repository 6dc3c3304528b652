"""Released SAM-2 checkpoint names → our `Grounding` module's names (ARCHITECTURE.md §1.3).

The released GeoPixel checkpoint stores SAM-2 under ``model.visual_model.*`` with the original
facebookresearch naming (``image_encoder.trunk.*``, ``sam_mask_decoder.*``, ...). Our grounding
module is built from transformers' own SAM-2 layers, whose names differ. This file holds the
one table that relates the two, plus the list of checkpoint families that only the video
memory path uses (known, unused, skipped), and the full released key list (with shapes) that a
:class:`~geopixel.config.GroundingConfig` implies.

No tensor needs reshaping: transformers' Hiera keeps the fused ``qkv`` layout
``(3 · dim_out, dim_in)`` of the original, and every other tensor keeps its shape. Released keys
may be given with or without the ``model.visual_model.`` prefix; ``text_hidden_fcs`` keys
(released as ``model.text_hidden_fcs.*``) are handled by :func:`convert_grounding_state_dict`.
"""

from __future__ import annotations

import re

from torch import Tensor

from geopixel.config import GroundingConfig

RELEASED_SAM2_PREFIX = "model.visual_model."
RELEASED_TEXT_FCS_PREFIX = "model.text_hidden_fcs."

# Checkpoint families used only by SAM-2's video memory path (or by point/box/mask prompts,
# which GeoPixel never gives): listed so that nothing is dropped silently.
SAM2_UNUSED_PREFIXES: tuple[str, ...] = (
    "memory_attention.",
    "memory_encoder.",
    "mask_downsample.",
    "obj_ptr_proj.",
    "maskmem_tpos_enc",
    "no_mem_pos_enc",
    "no_obj_ptr",
    "sam_prompt_encoder.point_embeddings.",
    "sam_prompt_encoder.not_a_point_embed.",
    "sam_prompt_encoder.mask_downscaling.",
)

_MLP3 = r"(output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head)"
_WB = r"(weight|bias)"
_BLOCK = r"image_encoder\.trunk\.blocks\.(\d+)\."
_OUR_BLOCK = r"image_encoder.backbone.blocks.\1."

# (released-name regex, our name template): every used released key matches exactly one row.
SAM2_NAME_RULES: tuple[tuple[str, str], ...] = (
    # Hiera trunk → Sam2HieraDetModel
    (r"image_encoder\.trunk\.patch_embed\.proj\." + _WB, r"image_encoder.backbone.patch_embed.projection.\1"),
    (r"image_encoder\.trunk\.(pos_embed|pos_embed_window)", r"image_encoder.backbone.\1"),
    (_BLOCK + r"norm([12])\." + _WB, _OUR_BLOCK + r"layer_norm\2.\3"),
    (_BLOCK + r"attn\.(qkv|proj)\." + _WB, _OUR_BLOCK + r"attn.\2.\3"),
    (_BLOCK + r"mlp\.layers\.0\." + _WB, _OUR_BLOCK + r"mlp.proj_in.\2"),
    (_BLOCK + r"mlp\.layers\.1\." + _WB, _OUR_BLOCK + r"mlp.proj_out.\2"),
    (_BLOCK + r"proj\." + _WB, _OUR_BLOCK + r"proj.\2"),
    # FPN neck (index 0 = deepest level in both)
    (r"image_encoder\.neck\.convs\.(\d+)\.conv\." + _WB, r"image_encoder.neck.convs.\1.\2"),
    # prompt encoder: only the random-Fourier PE and the no-mask dense embedding are used
    (r"sam_prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix", r"pe_layer.positional_embedding"),
    (r"sam_prompt_encoder\.no_mask_embed\.weight", r"no_mask_embed.weight"),
    (r"no_mem_embed", r"no_mem_embed"),
    # mask decoder: TwoWayTransformer
    (
        r"sam_mask_decoder\.transformer\.layers\.(\d+)\.norm([1-4])\." + _WB,
        r"mask_decoder.transformer.layers.\1.layer_norm\2.\3",
    ),
    (
        r"sam_mask_decoder\.transformer\.layers\.(\d+)\.(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
        r"\.([qkv])_proj\." + _WB,
        r"mask_decoder.transformer.layers.\1.\2.\3_proj.\4",
    ),
    (
        r"sam_mask_decoder\.transformer\.layers\.(\d+)\.(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
        r"\.out_proj\." + _WB,
        r"mask_decoder.transformer.layers.\1.\2.o_proj.\3",
    ),
    (
        r"sam_mask_decoder\.transformer\.layers\.(\d+)\.mlp\.layers\.0\." + _WB,
        r"mask_decoder.transformer.layers.\1.mlp.proj_in.\2",
    ),
    (
        r"sam_mask_decoder\.transformer\.layers\.(\d+)\.mlp\.layers\.1\." + _WB,
        r"mask_decoder.transformer.layers.\1.mlp.proj_out.\2",
    ),
    (
        r"sam_mask_decoder\.transformer\.final_attn_token_to_image\.([qkv])_proj\." + _WB,
        r"mask_decoder.transformer.final_attn_token_to_image.\1_proj.\2",
    ),
    (
        r"sam_mask_decoder\.transformer\.final_attn_token_to_image\.out_proj\." + _WB,
        r"mask_decoder.transformer.final_attn_token_to_image.o_proj.\1",
    ),
    (
        r"sam_mask_decoder\.transformer\.norm_final_attn\." + _WB,
        r"mask_decoder.transformer.layer_norm_final_attn.\1",
    ),
    # mask decoder: tokens, upscaling, high-res projections, heads
    (r"sam_mask_decoder\.(iou_token|mask_tokens|obj_score_token)\.weight", r"mask_decoder.\1.weight"),
    (r"sam_mask_decoder\.output_upscaling\.0\." + _WB, r"mask_decoder.upscale_conv1.\1"),
    (r"sam_mask_decoder\.output_upscaling\.1\." + _WB, r"mask_decoder.upscale_layer_norm.\1"),
    (r"sam_mask_decoder\.output_upscaling\.3\." + _WB, r"mask_decoder.upscale_conv2.\1"),
    (r"sam_mask_decoder\.(conv_s0|conv_s1)\." + _WB, r"mask_decoder.\1.\2"),
    # 3-layer MLPs: layers.0 → proj_in, layers.1 → layers.0, layers.2 → proj_out
    (r"sam_mask_decoder\." + _MLP3 + r"\.layers\.0\." + _WB, r"mask_decoder.\1.proj_in.\2"),
    (r"sam_mask_decoder\." + _MLP3 + r"\.layers\.1\." + _WB, r"mask_decoder.\1.layers.0.\2"),
    (r"sam_mask_decoder\." + _MLP3 + r"\.layers\.2\." + _WB, r"mask_decoder.\1.proj_out.\2"),
)

_COMPILED_RULES = tuple((re.compile(pattern), template) for pattern, template in SAM2_NAME_RULES)


def strip_sam2_prefix(name: str) -> str:
    """Drop a leading ``model.visual_model.`` (names without it are returned unchanged)."""
    return name[len(RELEASED_SAM2_PREFIX) :] if name.startswith(RELEASED_SAM2_PREFIX) else name


def is_unused_sam2_key(name: str) -> bool:
    """Whether a released SAM-2 key (prefix optional) is a known, unused video-memory/prompt key."""
    return strip_sam2_prefix(name).startswith(SAM2_UNUSED_PREFIXES)


def map_sam2_name(name: str) -> str | None:
    """Map one released SAM-2 key to our module's name.

    Args:
        name: Released key, with or without ``model.visual_model.``.

    Returns:
        Our name, or None for a known unused key (see ``SAM2_UNUSED_PREFIXES``).

    Raises:
        KeyError: The key is neither mapped nor known-unused (or matches several rules).
    """
    short = strip_sam2_prefix(name)
    if is_unused_sam2_key(short):
        return None
    hits = [pattern.sub(template, short) for pattern, template in _COMPILED_RULES if pattern.fullmatch(short)]
    if len(hits) != 1:
        raise KeyError(f"released SAM-2 key {name!r} matches {len(hits)} name rules (expected exactly 1)")
    return hits[0]


def convert_sam2_state_dict(released: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename released SAM-2 tensors to our `Grounding` names; skip known unused families.

    Args:
        released: Released ``model.visual_model.*`` tensors; keys with or without that prefix
            (but consistently one SAM-2 sub-tree: no ``text_hidden_fcs`` keys here).

    Returns:
        Our names → the same tensors (no copies, no reshapes): every key of
        ``Grounding.state_dict()`` except ``text_hidden_fcs.*`` when the input is complete.

    Raises:
        KeyError: A key is unknown, or two released keys land on the same name.
    """
    out: dict[str, Tensor] = {}
    for name, tensor in released.items():
        ours = map_sam2_name(name)
        if ours is None:
            continue
        if ours in out:
            raise KeyError(f"two released keys map to {ours!r} (last: {name!r})")
        out[ours] = tensor
    return out


def convert_grounding_state_dict(released: dict[str, Tensor]) -> dict[str, Tensor]:
    """Convert the released ``model.visual_model.*`` and ``model.text_hidden_fcs.*`` tensors.

    Args:
        released: Released tensors with their full checkpoint names; only these two families.

    Returns:
        Our `Grounding` names → tensors (``text_hidden_fcs.0.{0,2}.*`` keep their names).

    Raises:
        KeyError: A key outside the two families, or one the SAM-2 table does not know.
    """
    sam: dict[str, Tensor] = {}
    out: dict[str, Tensor] = {}
    for name, tensor in released.items():
        if name.startswith(RELEASED_TEXT_FCS_PREFIX):
            out[name[len("model.") :]] = tensor
        elif name.startswith(RELEASED_SAM2_PREFIX):
            sam[name] = tensor
        else:
            raise KeyError(
                f"{name!r} is not a grounding key (expected {RELEASED_SAM2_PREFIX}* or "
                f"{RELEASED_TEXT_FCS_PREFIX}*)"
            )
    out.update(convert_sam2_state_dict(sam))
    return out


Shape = tuple[int, ...]


def expected_released_sam2_keys(cfg: GroundingConfig) -> dict[str, Shape]:
    """Every ``model.visual_model.*`` key (prefix stripped) the reference's SAM-2 has for ``cfg``.

    Computed from the configuration alone (independently of our modules), including the unused
    video-memory families, so it can be checked against a real key listing.

    Args:
        cfg: Grounding sizes.

    Returns:
        Released name (without ``model.visual_model.``) → shape.
    """
    keys: dict[str, Shape] = {}
    keys.update(_hiera_keys(cfg))
    keys.update(_neck_keys(cfg))
    keys.update(_prompt_encoder_keys(cfg))
    keys.update(_mask_decoder_keys(cfg))
    keys.update(_memory_keys(cfg))
    keys["no_mem_embed"] = (1, 1, cfg.d_model)
    return keys


def hiera_stage_dims(cfg: GroundingConfig) -> list[int]:
    """Hiera width per stage (doubling at each stage), shallowest first."""
    return [cfg.hiera_embed_dim * 2**i for i in range(len(cfg.hiera_stages))]


def _linear(keys: dict[str, Shape], name: str, d_out: int, d_in: int) -> None:
    keys[f"{name}.weight"] = (d_out, d_in)
    keys[f"{name}.bias"] = (d_out,)


def _norm(keys: dict[str, Shape], name: str, dim: int) -> None:
    keys[f"{name}.weight"] = (dim,)
    keys[f"{name}.bias"] = (dim,)


def _conv(keys: dict[str, Shape], name: str, d_out: int, d_in: int, k: int) -> None:
    keys[f"{name}.weight"] = (d_out, d_in, k, k)
    keys[f"{name}.bias"] = (d_out,)


def _hiera_keys(cfg: GroundingConfig) -> dict[str, Shape]:
    keys: dict[str, Shape] = {}
    p = "image_encoder.trunk"
    c = cfg.hiera_embed_dim
    keys[f"{p}.pos_embed"] = (1, c, *cfg.hiera_window_pos_embed_bkg)
    keys[f"{p}.pos_embed_window"] = (1, c, cfg.hiera_window_spec[0], cfg.hiera_window_spec[0])
    _conv(keys, f"{p}.patch_embed.proj", c, 3, 7)
    dims = hiera_stage_dims(cfg)
    block = 0
    dim_in = c
    for stage, depth in enumerate(cfg.hiera_stages):
        dim_out = dims[stage]
        for _ in range(depth):
            b = f"{p}.blocks.{block}"
            _norm(keys, f"{b}.norm1", dim_in)
            _linear(keys, f"{b}.attn.qkv", 3 * dim_out, dim_in)
            _linear(keys, f"{b}.attn.proj", dim_out, dim_out)
            _norm(keys, f"{b}.norm2", dim_out)
            _linear(keys, f"{b}.mlp.layers.0", 4 * dim_out, dim_out)
            _linear(keys, f"{b}.mlp.layers.1", dim_out, 4 * dim_out)
            if dim_in != dim_out:
                _linear(keys, f"{b}.proj", dim_out, dim_in)
            dim_in = dim_out
            block += 1
    return keys


def _neck_keys(cfg: GroundingConfig) -> dict[str, Shape]:
    keys: dict[str, Shape] = {}
    for i, channels in enumerate(cfg.backbone_channel_list):
        _conv(keys, f"image_encoder.neck.convs.{i}.conv", cfg.d_model, channels, 1)
    return keys


def _prompt_encoder_keys(cfg: GroundingConfig) -> dict[str, Shape]:
    d = cfg.d_model
    p = "sam_prompt_encoder"
    keys: dict[str, Shape] = {f"{p}.pe_layer.positional_encoding_gaussian_matrix": (2, d // 2)}
    for i in range(4):
        keys[f"{p}.point_embeddings.{i}.weight"] = (1, d)
    keys[f"{p}.not_a_point_embed.weight"] = (1, d)
    mask_in_chans = 16  # SAM-2 constant
    _conv(keys, f"{p}.mask_downscaling.0", mask_in_chans // 4, 1, 2)
    _norm(keys, f"{p}.mask_downscaling.1", mask_in_chans // 4)
    _conv(keys, f"{p}.mask_downscaling.3", mask_in_chans, mask_in_chans // 4, 2)
    _norm(keys, f"{p}.mask_downscaling.4", mask_in_chans)
    _conv(keys, f"{p}.mask_downscaling.6", d, mask_in_chans, 1)
    keys[f"{p}.no_mask_embed.weight"] = (1, d)
    return keys


def _mask_decoder_keys(cfg: GroundingConfig) -> dict[str, Shape]:
    keys: dict[str, Shape] = {}
    d, inner = cfg.d_model, cfg.d_model // 2  # cross attentions downsample by 2
    p = "sam_mask_decoder"
    t = f"{p}.transformer"
    for layer in range(2):
        lp = f"{t}.layers.{layer}"
        _attention(keys, f"{lp}.self_attn", d, d)
        _attention(keys, f"{lp}.cross_attn_token_to_image", d, inner)
        _attention(keys, f"{lp}.cross_attn_image_to_token", d, inner)
        for n in range(1, 5):
            _norm(keys, f"{lp}.norm{n}", d)
        _linear(keys, f"{lp}.mlp.layers.0", cfg.mlp_dim, d)
        _linear(keys, f"{lp}.mlp.layers.1", d, cfg.mlp_dim)
    _attention(keys, f"{t}.final_attn_token_to_image", d, inner)
    _norm(keys, f"{t}.norm_final_attn", d)
    keys[f"{p}.iou_token.weight"] = (1, d)
    keys[f"{p}.mask_tokens.weight"] = (4, d)
    keys[f"{p}.obj_score_token.weight"] = (1, d)
    keys[f"{p}.output_upscaling.0.weight"] = (d, d // 4, 2, 2)  # ConvTranspose2d: (in, out, k, k)
    keys[f"{p}.output_upscaling.0.bias"] = (d // 4,)
    _norm(keys, f"{p}.output_upscaling.1", d // 4)
    keys[f"{p}.output_upscaling.3.weight"] = (d // 4, d // 8, 2, 2)
    keys[f"{p}.output_upscaling.3.bias"] = (d // 8,)
    _conv(keys, f"{p}.conv_s0", d // 8, d, 1)
    _conv(keys, f"{p}.conv_s1", d // 4, d, 1)
    for i in range(4):
        _mlp3(keys, f"{p}.output_hypernetworks_mlps.{i}", d, d, d // 8)
    _mlp3(keys, f"{p}.iou_prediction_head", d, cfg.iou_head_hidden_dim, 4)
    _mlp3(keys, f"{p}.pred_obj_score_head", d, d, 1)
    return keys


def _attention(keys: dict[str, Shape], name: str, d: int, inner: int, kv_in: int | None = None) -> None:
    _linear(keys, f"{name}.q_proj", inner, d)
    _linear(keys, f"{name}.k_proj", inner, kv_in or d)
    _linear(keys, f"{name}.v_proj", inner, kv_in or d)
    _linear(keys, f"{name}.out_proj", d, inner)


def _mlp3(keys: dict[str, Shape], name: str, d_in: int, hidden: int, d_out: int) -> None:
    _linear(keys, f"{name}.layers.0", hidden, d_in)
    _linear(keys, f"{name}.layers.1", hidden, hidden)
    _linear(keys, f"{name}.layers.2", d_out, hidden)


def _memory_keys(cfg: GroundingConfig) -> dict[str, Shape]:
    """The unused video-memory families (only to account for every checkpoint key)."""
    keys: dict[str, Shape] = {}
    d, mem = cfg.d_model, cfg.memory_out_dim
    for layer in range(cfg.memory_attention_layers):
        lp = f"memory_attention.layers.{layer}"
        _attention(keys, f"{lp}.self_attn", d, d)
        _attention(keys, f"{lp}.cross_attn_image", d, d, kv_in=cfg.memory_kv_in_dim)
        _linear(keys, f"{lp}.linear1", cfg.memory_attention_ffn, d)
        _linear(keys, f"{lp}.linear2", d, cfg.memory_attention_ffn)
        for n in range(1, 4):
            _norm(keys, f"{lp}.norm{n}", d)
    _norm(keys, "memory_attention.norm", d)
    chans = [1, 4, 16, 64, 256]  # mask downsampler: 4 stride-2 convs, ×4 channels each
    for i in range(4):
        _conv(keys, f"memory_encoder.mask_downsampler.encoder.{3 * i}", chans[i + 1], chans[i], 3)
        _norm(keys, f"memory_encoder.mask_downsampler.encoder.{3 * i + 1}", chans[i + 1])
    _conv(keys, "memory_encoder.mask_downsampler.encoder.12", d, chans[-1], 1)
    _conv(keys, "memory_encoder.pix_feat_proj", d, d, 1)
    for i in range(2):
        fp = f"memory_encoder.fuser.layers.{i}"
        keys[f"{fp}.weight"] = (d,)  # the vendored rename of CXBlock's `gamma`
        keys[f"{fp}.dwconv.weight"] = (d, 1, 7, 7)
        keys[f"{fp}.dwconv.bias"] = (d,)
        _norm(keys, f"{fp}.norm", d)
        _linear(keys, f"{fp}.pwconv1", 4 * d, d)
        _linear(keys, f"{fp}.pwconv2", d, 4 * d)
    _conv(keys, "memory_encoder.out_proj", mem, d, 1)
    keys["mask_downsample.weight"] = (1, 1, 4, 4)
    keys["mask_downsample.bias"] = (1,)
    for i in range(3):
        _linear(keys, f"obj_ptr_proj.layers.{i}", d, d)
    keys["maskmem_tpos_enc"] = (7, 1, 1, mem)
    keys["no_mem_pos_enc"] = (1, 1, d)
    keys["no_obj_ptr"] = (1, d)
    return keys
