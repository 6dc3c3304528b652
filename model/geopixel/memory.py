"""GPU memory and bandwidth arithmetic: batch size from free memory, and the decode/prefill limits.

Everything here is a pure function of the configuration, so it can be tested (and the limits in
docs/PERFORMANCE.md recomputed) without a GPU. The activation estimates count the largest
tensors that are alive at the same time in eager execution; they are upper bounds for the
compiled step, which fuses some of them away.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from geopixel.config import GeoPixelConfig, GroundingConfig, LLMConfig, VisionConfig
from geopixel.generate import cache_length

GIB = 2**30
MAX_AUTO_BATCH = 32  # beyond this, decode is compute-bound on an H100 and the prefill burst is long
MARGIN_FRACTION = 0.10  # allocator fragmentation, CUDA-graph memory pools
MARGIN_BYTES = 2 * GIB  # cuBLAS/cuDNN workspaces, the CUDA context growing with new kernels
TEXT_TOKENS = 64  # BOS + chat template + a typical question, on top of the image tokens


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def kv_bytes_per_token(llm: LLMConfig, dtype: torch.dtype) -> int:
    """KV-cache bytes of one token of one row: ``2 × layers × kv_heads × head_dim × bytes``.

    GeoPixel-7B in bf16: 2 × 32 × 8 × 128 × 2 = 131,072 B (128 KiB) per token.
    """
    return 2 * llm.num_layers * llm.num_kv_heads * llm.head_dim * element_size(dtype)


def prefill_bytes_per_row(llm: LLMConfig, *, tokens: int, new_tokens: int, dtype: torch.dtype) -> int:
    """Activation bytes one row adds during prefill (largest live tensors of one layer at ``tokens``).

    Per token: the MLP intermediate ×4 (``silu(w1 x)`` and ``w3 x`` held for their product, plus
    the Partial-LoRA temporaries ``W x + B A x`` and its ``torch.where`` on image rows), the fused
    ``qkv``, queries after RoPE and the attention output (2 × heads × head_dim), the keys and
    values expanded to every query head for the masked (left-padded) prefill (2 × heads ×
    head_dim, see :func:`geopixel.llm.gqa_attention`), and 4 × hidden
    (residual stream, normed input, block output, the prompt's padded copy); per row also the
    (T, T) left-padding mask in bool and as SDPA's additive bias, the final-normed prompt hidden
    states and the prompt embeddings (2 × T × hidden), the [SEG] workspace of ``new_tokens`` rows and
    the fp32 logits of the last position (×2 for sampling).

    Args:
        llm: LLM sizes.
        tokens: Prompt length T.
        new_tokens: Answer length (the [SEG] workspace).
        dtype: Activation dtype.
    """
    size = element_size(dtype)
    width = llm.num_heads * llm.head_dim
    per_token = 4 * llm.intermediate_size + llm.qkv_size + 4 * width + 4 * llm.hidden_size
    prompt = 2 * tokens * llm.hidden_size + new_tokens * llm.hidden_size
    mask = tokens * tokens * (1 + size)
    return (tokens * per_token + prompt) * size + mask + 2 * 4 * llm.vocab_size


def clip_bytes_per_image(vision: VisionConfig, llm: LLMConfig, *, crops: int, dtype: torch.dtype) -> int:
    """CLIP bytes of one image of ``crops`` 560 px crops (global view included).

    Per crop and layer: 6 × width (residual, LayerNorm output, q, k, v, attention output) plus
    2 × MLP width (fc1 output and its activation) per token, the crop's pixels (in the model
    dtype: they are cast on the host) and its kept patch features; per image the merged tokens,
    the projector's hidden layer and the projected image tokens (one LLM-width row per image
    token).
    """
    size = element_size(dtype)
    side = vision.image_size // vision.patch_size
    tokens = side * side + 1
    layer = tokens * (6 * vision.hidden_size + 2 * vision.intermediate_size) * size
    pixels = 3 * vision.image_size**2 * size
    features = tokens * vision.hidden_size * size
    image_tokens = crops * vision.merged_grid**2 + 1 + (crops + 1) * vision.merged_grid  # upper bound
    merged = image_tokens * (vision.merged_size + vision.proj_hidden_size + llm.hidden_size) * size
    return crops * (layer + pixels + features) + merged


def sam_bytes_per_image(grounding: GroundingConfig, *, dtype: torch.dtype) -> int:
    """SAM-2 image-encoder bytes of one 1024² image.

    Hiera stage i has ``(S/4 / 2^i)²`` tokens of width ``C·2^i`` and ``heads·2^i`` heads. Per
    stage the largest block holds 11 × width per token (residual, norm, q, k, v, attention
    output, 4 × MLP width, the block output); a stage with global attention also holds the
    attention matrix (heads × tokens² in case SDPA falls back to the math kernel). Added: the
    stage outputs and the 256-channel FPN levels kept for the decoder, and the input (in the
    model dtype: it is prepared on the host).
    """
    size = element_size(dtype)
    base = (grounding.image_size // 4) ** 2
    firsts = [sum(grounding.hiera_stages[:i]) for i in range(len(grounding.hiera_stages))]
    largest, kept = 0, 0
    for i, blocks in enumerate(grounding.hiera_stages):
        tokens, width = base // 4**i, grounding.hiera_embed_dim * 2**i
        heads = grounding.hiera_num_heads * 2**i
        block = tokens * width * 11 * size
        if any(firsts[i] <= g < firsts[i] + blocks for g in grounding.hiera_global_att_blocks):
            block += heads * tokens * tokens * size
        largest = max(largest, block)
        kept += tokens * (width + grounding.d_model) * size
    return largest + kept + 3 * grounding.image_size**2 * size


def bytes_per_row(
    config: GeoPixelConfig,
    *,
    prompt_tokens: int,
    max_new_tokens: int,
    dtype: torch.dtype,
    crops_per_image: int | None = None,
) -> dict[str, int]:
    """The per-row budget of :func:`auto_batch_size`, by component (bytes)."""
    llm = config.llm
    crops = crops_per_image if crops_per_image is not None else config.default_hd_num + 1
    slots = cache_length(prompt_tokens + max_new_tokens, max_position=llm.max_position_embeddings)
    return {
        "kv_cache": slots * kv_bytes_per_token(llm, dtype),
        "prefill": prefill_bytes_per_row(llm, tokens=prompt_tokens, new_tokens=max_new_tokens, dtype=dtype),
        "clip": clip_bytes_per_image(config.vision, llm, crops=crops, dtype=dtype),
        "sam2": sam_bytes_per_image(config.grounding, dtype=dtype),
    }


def auto_batch_size(
    *,
    free_bytes: int,
    config: GeoPixelConfig,
    prompt_tokens: int,
    max_new_tokens: int,
    dtype: torch.dtype,
    crops_per_image: int | None = None,
    cap: int = MAX_AUTO_BATCH,
) -> int:
    """Images per model call that fit ``free_bytes`` (free device memory after loading the weights).

    Per row: KV cache + prefill activations + CLIP + SAM-2 encoder (:func:`bytes_per_row`). The
    four are summed although CLIP, prefill and SAM-2 run one after another and CLIP/SAM-2 run in
    bounded chunks, so the estimate is an upper bound. From ``free_bytes`` a margin of 10 % + 2 GiB
    is kept back. The result is at least 1 and at most ``cap``.

    GeoPixel-7B in bf16, an 800 px tile at hd_num 9 (4,081 image tokens + 64 text = 4,145
    prompt tokens), 1,024 new tokens, on an 80 GB card holding 17.8 GB of weights
    (``free_bytes`` = 62e9):

    * KV cache: 4,145 + 1,024 = 5,169 → 5,376 slots × 128 KiB = 0.705 GB
    * prefill: 4,145 × (4 × 14,336 + 6,144 + 4 × 4,096 + 4 × 4,096) × 2 B = 0.798 GB, + prompt
      embeddings/hidden (2 × 4,145 + 1,024) × 4,096 × 2 B = 0.076 GB, + mask 4,145² × 3 B
      = 0.052 GB → 0.926 GB
    * CLIP: 10 crops × (1,601 × (6 × 1,024 + 2 × 4,096) × 2 B + 1.9 MB pixels + 3.3 MB features)
      = 0.510 GB, + 4,221 tokens × 3 × 4,096 × 2 B = 0.104 GB → 0.614 GB
    * SAM-2 Hiera-L: stage 3 with global attention 4,096 × 576 × 11 × 2 B + 8 heads × 4,096² × 2 B
      = 0.320 GB, + kept stage/FPN outputs 0.080 GB + bf16 input 0.006 GB → 0.406 GB
    * per row 2.65 GB; usable 62e9 × 0.9 − 2 GiB = 53.65 GB → 20 rows (about 70 GB in use at
      most, weights included).

    Args:
        free_bytes: Free device memory (what the caching allocator holds unused included).
        config: Model sizes.
        prompt_tokens: Prompt length per image (image + text tokens).
        max_new_tokens: Answer length limit.
        dtype: Weights/activation dtype.
        crops_per_image: CLIP crops per image (default ``default_hd_num + 1``).
        cap: Largest batch returned.

    Returns:
        The batch size.
    """
    per_row = sum(
        bytes_per_row(
            config,
            prompt_tokens=prompt_tokens,
            max_new_tokens=max_new_tokens,
            dtype=dtype,
            crops_per_image=crops_per_image,
        ).values()
    )
    usable = free_bytes * (1 - MARGIN_FRACTION) - MARGIN_BYTES
    return max(1, min(cap, int(usable // per_row)))


def tile_prompt_tokens(config: GeoPixelConfig, *, width: int, height: int, hd_num: int) -> tuple[int, int]:
    """Prompt tokens and CLIP crops of one ``width`` × ``height`` tile (inference grid, §3).

    Returns:
        ``(image tokens + TEXT_TOKENS, crops including the global view)``.
    """
    from geopixel.hd_divider import image_token_count, plan_grid

    grid = plan_grid(width, height, hd_num, rule="inference", tile=config.vision.image_size)
    image = image_token_count(grid.rows, grid.cols, merged_grid=config.vision.merged_grid)
    return image + TEXT_TOKENS, grid.num_tiles + 1


# ---- physical limits (docs/PERFORMANCE.md, benchmarks) --------------------------------------


def decode_weight_bytes(llm: LLMConfig, dtype: torch.dtype) -> int:
    """LLM weight bytes one decode step reads.

    Every block's ``wqkv``, ``wo``, ``w1``, ``w3``, ``w2`` and norms, the final norm and the
    ``output`` head. Not counted: the Partial-LoRA adapters (text tokens skip them), the unused
    ``lora_sft/dpo/web`` adapters (never built), the embedding table (B rows are gathered), CLIP
    and SAM-2 (not run while decoding).
    """
    c, f = llm.hidden_size, llm.intermediate_size
    per_layer = c * llm.qkv_size + llm.num_heads * llm.head_dim * c + 3 * c * f + 2 * c
    return (llm.num_layers * per_layer + c + llm.vocab_size * c) * element_size(dtype)


def decode_step_bytes(llm: LLMConfig, *, batch: int, context: int, dtype: torch.dtype) -> int:
    """Bytes one decode step must read: the weights once plus ``batch`` rows of ``context`` cached tokens."""
    return decode_weight_bytes(llm, dtype) + batch * context * kv_bytes_per_token(llm, dtype)


def prefill_flops(llm: LLMConfig, *, tokens: int, image_tokens: int) -> float:
    """FLOPs of one prompt's prefill: linears (2 × params × T), PLoRA on image tokens, causal attention.

    The ``output`` head runs on the last position only.
    """
    c, f, r = llm.hidden_size, llm.intermediate_size, llm.plora_r
    width = llm.num_heads * llm.head_dim
    linear = c * llm.qkv_size + width * c + 3 * c * f
    adapters = r * ((c + llm.qkv_size) + (width + c) + 3 * (c + f))
    attention = 2 * tokens * tokens * width  # QK^T and PV, 2 FLOPs each, half of T² (causal)
    per_layer = 2 * linear * tokens + 2 * adapters * image_tokens + attention
    return float(llm.num_layers * per_layer + 2 * c * llm.vocab_size)


def limits(
    llm: LLMConfig,
    *,
    bandwidth: float,
    flops: float,
    context: int,
    batches: Sequence[int],
    prompt_tokens: int,
    image_tokens: int,
    dtype: torch.dtype,
) -> dict[str, float]:
    """Lower bounds on decode step time and prefill time for a device of ``bandwidth`` B/s and ``flops``.

    Returns:
        ``decode_ms_b{B}`` and ``decode_tok_s_b{B}`` per batch, ``prefill_ms``.
    """
    out: dict[str, float] = {}
    for b in batches:
        ms = 1000 * decode_step_bytes(llm, batch=b, context=context, dtype=dtype) / bandwidth
        out[f"decode_ms_b{b}"], out[f"decode_tok_s_b{b}"] = ms, 1000 * b / ms
    out["prefill_ms"] = 1000 * prefill_flops(llm, tokens=prompt_tokens, image_tokens=image_tokens) / flops
    return out
