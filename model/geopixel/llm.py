"""InternLM2 decoder with Partial-LoRA linears and a static KV cache (ARCHITECTURE.md §6).

Module names mirror the released checkpoint, so ``InternLM2.state_dict()`` keys are the released
LLM keys with the ``model.`` prefix removed (``tok_embeddings.weight``, ``layers.N.attention.wqkv.
{weight,Plora_A.weight,Plora_B.weight}``, ``layers.N.feed_forward.w1.weight``, ``norm.weight``, ...)
plus ``output.weight`` kept as is (see :func:`llm_state_dict`). The never-used ``lora_sft/dpo/web``
adapters are not built. KV caches are non-persistent buffers and never appear in the state dict.

Padding convention: batches of prompts with different lengths are **left-padded**. Every row's
real tokens end at the same column, so one shared cache slot (``input_pos``) serves the whole
batch while each row carries its own RoPE positions (``0..len-1`` for its real tokens) and an
attention mask that hides its pad columns (:func:`padding_mask`). Right-padded training batches
use the same mask with the default positions ``0..T-1``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from geopixel.config import LLMConfig

UNUSED_ADAPTERS = ("lora_sft", "lora_dpo", "lora_web")
LLM_PREFIXES = ("model.tok_embeddings.", "model.layers.", "model.norm.")


class KVCache(nn.Module):
    """Preallocated keys/values of one layer, written in place at ``input_pos`` (never grown).

    Args:
        batch: Rows.
        max_len: Slots (prompt + new tokens).
        kv_heads: Key/value heads.
        head_dim: Head width.
        dtype: Storage dtype (the activation dtype).
        device: Storage device.
    """

    def __init__(
        self,
        batch: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.k_cache: Tensor
        self.v_cache: Tensor

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v`` (B, kvh, T, hd) at slots ``input_pos`` (T,); return the whole cache."""
        self.k_cache.index_copy_(2, input_pos, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, input_pos, v.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache  # (B, kvh, S, hd)


def _cache_key(cache: KVCache) -> tuple[object, ...]:
    """What :meth:`InternLM2.setup_caches` compares before reusing ``cache``."""
    k = cache.k_cache
    return (*k.shape, k.dtype, k.device.type, k.is_inference())


class InternLM2(nn.Module):
    """InternLM2 decoder: embeddings, pre-norm blocks, final RMSNorm and the ``output`` head.

    Args:
        config: LLM sizes.
        lora_dropout: Dropout on the PLoRA adapter input (train mode only).
    """

    def __init__(self, config: LLMConfig, *, lora_dropout: float = 0.05) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config, lora_dropout=lora_dropout) for _ in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.cache_len = 0

    def setup_caches(self, *, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate one :class:`KVCache` per layer.

        Existing caches are reused when batch, length, dtype, device and inference-mode-ness
        match: caches allocated under ``torch.inference_mode`` (``GeoPixel.describe``) are
        inference tensors that cannot be written in place outside it, so a call outside
        inference mode gets new ones (and vice versa, to keep one kind of cache per mode).
        """
        cfg, dev = self.config, torch.device(device)
        inference = torch.is_inference_mode_enabled()
        key = (batch, cfg.num_kv_heads, max_len, cfg.head_dim, dtype, dev.type, inference)
        for layer in self.layers:
            old = layer.attention.kv_cache
            if old is None or _cache_key(old) != key:
                layer.attention.kv_cache = KVCache(
                    batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=dev
                )
        self.cache_len = max_len

    def clear_caches(self) -> None:
        """Free the KV caches."""
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.cache_len = 0

    def forward(
        self,
        inputs_embeds: Tensor,
        *,
        im_mask: Tensor | None = None,
        positions: Tensor | None = None,
        attn_mask: Tensor | None = None,
        input_pos: Tensor | None = None,
        attend_cache: bool = False,
    ) -> Tensor:
        """Run the decoder; return the final-normed hidden states (B, T, C).

        Args:
            inputs_embeds: Input embeddings (B, T, C).
            im_mask: Image-token rows (B, T) bool, where the PLoRA adapters apply. None (or all
                false) skips every adapter matmul.
            positions: RoPE position ids (T,) or (B, T); default ``0..T-1``.
            attn_mask: Boolean "may attend" mask, (B, 1, T, T) over this call's keys, or
                (B, 1, T, S) over the cache when ``attend_cache``. None means plain causal.
            input_pos: Cache slots (T,) to write this call's keys/values to (needs
                :meth:`setup_caches`); None leaves the caches untouched (training).
            attend_cache: Attend over the whole cache (decode) instead of this call's keys
                (prefill from slot 0, training). Requires ``attn_mask``.

        Returns:
            Final-normed hidden states (B, T, C) (what the ``output`` head and the [SEG]
            projection consume).
        """
        states = self.hidden_states(
            inputs_embeds,
            im_mask=im_mask,
            positions=positions,
            attn_mask=attn_mask,
            input_pos=input_pos,
            attend_cache=attend_cache,
            keep_all=False,
        )
        return states[-1]

    def hidden_states(
        self,
        inputs_embeds: Tensor,
        *,
        im_mask: Tensor | None = None,
        positions: Tensor | None = None,
        attn_mask: Tensor | None = None,
        input_pos: Tensor | None = None,
        attend_cache: bool = False,
        keep_all: bool = True,
    ) -> list[Tensor]:
        """Like :meth:`forward` but return ``[embeddings, block 1 out, ..., final-normed]``.

        This is the HF ``output_hidden_states`` convention (the last block's raw output is
        replaced by the final-normed tensor). With ``keep_all=False`` only the final-normed
        tensor is returned (in a one-element list). Arguments as in :meth:`forward`.
        """
        seqlen = inputs_embeds.shape[1]
        if attend_cache and (attn_mask is None or input_pos is None):
            raise ValueError("attend_cache needs input_pos and an attn_mask over the cache")
        if im_mask is not None and not torch.compiler.is_compiling() and not bool(im_mask.any()):
            im_mask = None  # no image rows: skip the adapters entirely (one host sync, prefill only)
        if positions is None:
            positions = torch.arange(seqlen, device=inputs_embeds.device)
        rope_len = self.cache_len if input_pos is not None else seqlen
        cos, sin = rope_cos_sin(positions, self.config, total_len=rope_len, dtype=inputs_embeds.dtype)
        ckpt = self.gradient_checkpointing and self.training and input_pos is None
        x = inputs_embeds  # (B, T, C)
        states = [x] if keep_all else []
        for layer in self.layers:
            kw = {
                "im_mask": im_mask,
                "attn_mask": attn_mask,
                "input_pos": input_pos,
                "attend_cache": attend_cache,
            }
            x = (
                checkpoint(layer, x, cos, sin, use_reentrant=False, **kw)
                if ckpt
                else layer(x, cos, sin, **kw)
            )
            if keep_all:
                states.append(x)
        hidden = self.norm(x)  # (B, T, C)
        return [*states[:-1], hidden] if keep_all else [hidden]

    def logits(self, hidden: Tensor) -> Tensor:
        """Project final-normed hidden states (..., C) to float32 logits (..., vocab)."""
        return self.output(hidden).float()


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + Attn(norm(x)); y = h + FFN(norm(h))``."""

    def __init__(self, config: LLMConfig, *, lora_dropout: float) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attention = Attention(config, lora_dropout=lora_dropout)
        self.ffn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.feed_forward = FeedForward(config, lora_dropout=lora_dropout)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        *,
        im_mask: Tensor | None,
        attn_mask: Tensor | None,
        input_pos: Tensor | None,
        attend_cache: bool,
    ) -> Tensor:
        """Apply the block to ``x`` (B, T, C)."""
        h = x + self.attention(
            self.attention_norm(x),
            cos,
            sin,
            im_mask=im_mask,
            attn_mask=attn_mask,
            input_pos=input_pos,
            attend_cache=attend_cache,
        )
        return h + self.feed_forward(self.ffn_norm(h), im_mask=im_mask)


class Attention(nn.Module):
    """GQA self-attention with the fused, per-KV-group ``wqkv`` layout (§6.2).

    ``wqkv`` output rows are laid out as (kv_heads, groups + 2, head_dim): for KV group g the
    slots 0..groups-1 are query heads ``g*groups + s``, slot ``groups`` is key head g and slot
    ``groups + 1`` value head g. Query head h therefore uses KV head ``h // groups``, which is
    what SDPA's ``enable_gqa`` (repeat-interleave of KV heads) computes. See
    :func:`gqa_attention` for the SDPA call of each case.
    """

    def __init__(self, config: LLMConfig, *, lora_dropout: float) -> None:
        super().__init__()
        self.config = config
        c, r, a = config.hidden_size, config.plora_r, config.plora_alpha
        self.wqkv = PLoRALinear(c, config.qkv_size, r=r, alpha=a, dropout=lora_dropout)
        self.wo = PLoRALinear(config.num_heads * config.head_dim, c, r=r, alpha=a, dropout=lora_dropout)
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        *,
        im_mask: Tensor | None,
        attn_mask: Tensor | None,
        input_pos: Tensor | None,
        attend_cache: bool,
    ) -> Tensor:
        """Attend ``x`` (B, T, C); optionally write/read the KV cache."""
        cfg = self.config
        bsz, seqlen, _ = x.shape
        q, k, v = split_qkv(self.wqkv(x, im_mask), cfg)  # (B, H, T, hd), (B, kvh, T, hd) x2
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("input_pos given but no KV cache: call setup_caches first")
            k_all, v_all = self.kv_cache.update(input_pos, k, v)
            if attend_cache:
                k, v = k_all, v_all  # (B, kvh, S, hd)
        y = gqa_attention(q, k, v, attn_mask=attn_mask, groups=cfg.num_groups)  # (B, T, H*hd)
        return self.wo(y, im_mask)


def gqa_attention(q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None, groups: int) -> Tensor:
    """Grouped-query SDPA shaped so that CUDA never falls back to the math kernel.

    On CUDA, ``enable_gqa`` is only supported by the flash and math kernels, and flash takes no
    mask, so ``enable_gqa`` together with a mask runs the math kernel (K/V repeated, fp32 score
    matrices). Three cases avoid it:

    * no mask (unpadded prefill, training without padding): ``is_causal`` + ``enable_gqa``
      (flash);
    * one query token with a mask (decode): the ``groups`` query heads of each KV head are folded
      into the query-length dimension, q (B, H, 1, hd) -> (B, kvh, groups, hd), and attend over
      k, v (B, kvh, S, hd) with the mask broadcast as (B, 1, 1, S): plain multi-head attention
      with a mask (memory-efficient kernel), no K/V copy;
    * several query tokens with a mask (padded prefill or training): K/V are expanded to H heads
      (``repeat_interleave``, the grouped layout) and SDPA runs with the mask
      (memory-efficient kernel).

    Args:
        q: Queries (B, H, T, hd), head ``h`` using KV head ``h // groups``.
        k: Keys (B, kvh, S, hd).
        v: Values (B, kvh, S, hd).
        attn_mask: Boolean "may attend" mask broadcastable to (B, 1, T, S), or None for causal.
        groups: Query heads per KV head (H / kvh).

    Returns:
        The attended values (B, T, H*hd), heads in order.
    """
    bsz, heads, seqlen, hd = q.shape
    if attn_mask is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)  # (B, H, T, hd)
    elif seqlen == 1 and groups > 1:
        folded = q.reshape(bsz, k.shape[1], groups, hd)  # (B, kvh, groups, hd): head = kv*groups + s
        mask = attn_mask.reshape(attn_mask.shape[0], 1, 1, attn_mask.shape[-1])  # (B|1, 1, 1, S)
        y = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask)  # (B, kvh, groups, hd)
        return y.reshape(bsz, 1, heads * hd)
    else:
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, T, hd)
    return y.transpose(1, 2).reshape(bsz, seqlen, heads * hd)  # (B, T, H*hd)


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)`` (w1 gate, w3 up, w2 down), all PLoRA."""

    def __init__(self, config: LLMConfig, *, lora_dropout: float) -> None:
        super().__init__()
        c, f, r, a = config.hidden_size, config.intermediate_size, config.plora_r, config.plora_alpha
        self.w1 = PLoRALinear(c, f, r=r, alpha=a, dropout=lora_dropout)
        self.w3 = PLoRALinear(c, f, r=r, alpha=a, dropout=lora_dropout)
        self.w2 = PLoRALinear(f, c, r=r, alpha=a, dropout=lora_dropout)

    def forward(self, x: Tensor, *, im_mask: Tensor | None) -> Tensor:
        """Apply the MLP to ``x`` (B, T, C)."""
        return self.w2(F.silu(self.w1(x, im_mask)) * self.w3(x, im_mask), im_mask)


class PLoRALinear(nn.Module):
    """Partial LoRA: a bias-free linear plus a low-rank adapter added on image rows only (§6.4).

    ``y = W x`` everywhere, ``+ (alpha / r) * B(A(dropout(x)))`` where ``im_mask`` is true. The
    adapter is evaluated on all rows and selected with ``torch.where`` (static shapes, no host
    sync): GeoPixel prompts are ~99% image tokens, so gathering the image rows would save
    almost nothing. With ``im_mask=None`` (decode steps, text-only batches) the adapter is not
    computed at all. Non-image rows are bitwise ``W x``.

    Args:
        in_features: Input width.
        out_features: Output width.
        r: Adapter rank.
        alpha: Adapter alpha (scaling = alpha / r).
        dropout: Dropout probability on the adapter input (train mode only).
    """

    def __init__(
        self, in_features: int, out_features: int, *, r: int, alpha: float, dropout: float = 0.05
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.Plora_A = nn.Linear(in_features, r, bias=False)
        self.Plora_B = nn.Linear(r, out_features, bias=False)
        self.lora_dropout = nn.Dropout(dropout)
        self.scaling = alpha / r
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        nn.init.zeros_(self.Plora_B.weight)

    def forward(self, x: Tensor, im_mask: Tensor | None = None) -> Tensor:
        """Map ``x`` (B, T, in) to (B, T, out); the adapter only where ``im_mask`` (B, T)."""
        y = F.linear(x, self.weight)
        if im_mask is None:
            return y
        lora = self.Plora_B(self.Plora_A(self.lora_dropout(x))) * self.scaling
        return torch.where(im_mask.unsqueeze(-1), y + lora, y)


class RMSNorm(nn.Module):
    """RMSNorm as InternLM2: normalize in float32, cast back, THEN multiply by the weight."""

    def __init__(self, dim: int, *, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """Normalize the last dim of ``x``."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def padding_mask(valid: Tensor) -> Tensor:
    """Causal "may attend" mask (B, 1, T, T) for a padded batch; ``valid`` (B, T) marks real tokens.

    Works for left padding (generation) and right padding (training). Every query also sees
    itself, so a pad row is never fully masked: some SDPA kernels return NaN for such rows, and
    NaN pad keys/values would then poison real rows through ``0 * NaN``.
    """
    seqlen = valid.shape[1]
    idx = torch.arange(seqlen, device=valid.device)
    causal = idx[None, :] <= idx[:, None]  # (T, T): key <= query
    eye = torch.eye(seqlen, dtype=torch.bool, device=valid.device)
    return ((causal[None] & valid[:, None, :].bool()) | eye).unsqueeze(1)  # (B, 1, T, T)


def split_qkv(qkv: Tensor, config: LLMConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Split fused ``wqkv`` output (B, T, kvh*(g+2)*hd) into q (B, H, T, hd), k, v (B, kvh, T, hd)."""
    bsz, seqlen, _ = qkv.shape
    g, hd = config.num_groups, config.head_dim
    qkv = qkv.view(bsz, seqlen, config.num_kv_heads, g + 2, hd)  # (B, T, kvh, g+2, hd)
    q = qkv[:, :, :, :g].reshape(bsz, seqlen, config.num_heads, hd)  # head = kv*g + s
    k, v = qkv[:, :, :, g], qkv[:, :, :, g + 1]  # (B, T, kvh, hd)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def rope_base(config: LLMConfig, total_len: int) -> float:
    """RoPE base for a sequence of ``total_len`` positions (dynamic NTK, §6.3).

    A pure function of the length: ``theta`` up to ``max_position_embeddings``, beyond it
    ``theta * (factor * L / max_pos - (factor - 1)) ** (d / (d - 2))``. The reference instead keeps
    the first scaled base it ever computed for the rest of the process; we do not reproduce that
    state. With a KV cache, ``L`` is the cache length (prompt + new tokens), fixed per generation.
    """
    if total_len <= config.max_position_embeddings:
        return config.rope_theta
    f, d = config.rope_scaling_factor, config.head_dim
    return config.rope_theta * ((f * total_len / config.max_position_embeddings) - (f - 1)) ** (d / (d - 2))


def rope_cos_sin(
    positions: Tensor, config: LLMConfig, *, total_len: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Cos/sin tables (B|1, 1, T, hd) for ``positions`` (T,) or (B, T), computed in fp32, cast to ``dtype``.

    ``angle = t * inv_freq`` in float32 is the same single multiply as the reference's table, so
    the values are bitwise equal; the cast to ``dtype`` is the reference's bf16 rounding.
    """
    d = config.head_dim
    base = rope_base(config, total_len)
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, device=positions.device).float() / d))  # (hd/2,)
    pos = positions if positions.dim() == 2 else positions.unsqueeze(0)  # (B|1, T)
    angles = pos.float().unsqueeze(-1) * inv_freq  # (B|1, T, hd/2)
    emb = torch.cat((angles, angles), dim=-1).unsqueeze(1)  # (B|1, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE: ``x cos + rot(x) sin`` with ``rot([a, b]) = [-b, a]``; x is (B, h, T, hd)."""
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin


def llm_state_dict(released: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Select the LLM tensors of a released GeoPixel state dict, in :class:`InternLM2` names.

    Mapping: ``model.tok_embeddings.*``, ``model.layers.*``, ``model.norm.*`` lose the ``model.``
    prefix; ``output.weight`` is kept; the unused ``lora_sft/dpo/web`` adapters are dropped;
    everything else (vision, SAM-2, text projection) is not LLM and ignored.
    """
    out: dict[str, Tensor] = {}
    for key, value in released.items():
        if any(f".{name}_" in key for name in UNUSED_ADAPTERS):
            continue
        if key.startswith(LLM_PREFIXES):
            out[key.removeprefix("model.")] = value
        elif key == "output.weight":
            out[key] = value
    return out
