"""KV-cached batched decoding that keeps only the last-layer hidden states at [SEG] inputs (§8.1).

gpt-fast style: :func:`setup_caches` preallocates the caches, :func:`prefill` runs the prompt and
:func:`decode_one_token` runs one step; both take static shapes and never call ``.item()`` so
they can be compiled: :func:`compile_decode_step` wraps ``decode_one_token`` in
``torch.compile`` (``mode="reduce-overhead"``: CUDA graphs) and :func:`generate` takes the result
as ``decode_fn``. The loop in :func:`generate` keeps tokens and stop flags on the device and only
looks at them on the host every ``stop_check_every`` steps.

CUDA graphs replay fixed memory addresses, so the caches must outlive one call: the cache length
is rounded up to a multiple of :data:`CACHE_MULTIPLE` (:func:`cache_length`) and
:meth:`InternLM2.setup_caches` reuses the existing caches when batch, length, dtype and device
match, so consecutive batches of equal-sized tiles run in the same buffers (and the same captured
graph). Unused slots are masked out in decode, so the rounding does not change the result.

Batches of prompts with different lengths are left-padded (see :mod:`geopixel.llm`): row b's
real tokens have RoPE positions ``0..len_b-1`` and its pad columns are masked out, so a batched
run equals single runs up to float rounding.

[SEG] hidden states follow the reference (§8.1 point 5): a [SEG] emitted at step k is fed at
step k+1, and the final-normed hidden state computed at that input position is kept; its position
in the row's sequence is ``prompt_len + k``. A [SEG] that is the last generated token (cut off by
``max_new_tokens``) is never fed and is ignored, as in the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import torch
from torch import Tensor

from geopixel.llm import InternLM2, padding_mask

CACHE_MULTIPLE = 256  # cache slots are allocated in steps of this many tokens (see cache_length)


class DecodeFn(Protocol):
    """Signature of a decode step: :func:`decode_one_token` or its compiled form."""

    def __call__(
        self, model: InternLM2, embeds: Tensor, *, input_pos: Tensor, pad: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Feed ``embeds`` (B, 1, C) at slot ``input_pos``; return hidden (B, C) and logits (B, V)."""
        ...


@dataclass
class GenerationOutput:
    """Result of :func:`generate` for a batch of B prompts.

    Attributes:
        token_ids: Generated ids per row, up to and including the first EOS (if any).
        seg_hidden: Per row, final-normed hidden states (n_seg, C) at the [SEG] input positions.
        seg_positions: Per row, index of each kept [SEG] in the row's own (unpadded) sequence
            ``prompt + generated``, i.e. ``prompt_len + k`` for the k-th generated token.
        prompt_lengths: Unpadded prompt length per row.
    """

    token_ids: list[list[int]]
    seg_hidden: list[Tensor]
    seg_positions: list[list[int]]
    prompt_lengths: list[int]


def setup_caches(
    model: InternLM2,
    *,
    batch: int,
    max_len: int,
    dtype: torch.dtype,
    device: torch.device | str,
    static: bool = False,
) -> None:
    """Preallocate ``model``'s KV caches for ``batch`` rows of ``max_len`` slots.

    Existing caches of the same shape, dtype and device are kept (no new allocation).

    Args:
        model: The decoder.
        batch: Rows.
        max_len: Slots per row.
        dtype: Cache dtype.
        device: Cache device.
        static: Mark the cache tensors as static addresses for ``torch.compile`` (what HF's
            ``StaticCache`` does): CUDA graphs then write them in place instead of treating them
            as inputs to copy or refusing to capture a graph that mutates them.
    """
    model.setup_caches(batch=batch, max_len=max_len, dtype=dtype, device=torch.device(device))
    if static:
        for layer in model.layers:
            cache = layer.attention.kv_cache
            if cache is not None:
                torch._dynamo.mark_static_address(cache.k_cache)
                torch._dynamo.mark_static_address(cache.v_cache)


def cache_length(needed: int, *, max_position: int, multiple: int = CACHE_MULTIPLE) -> int:
    """Cache slots to allocate for ``needed`` tokens: ``needed`` rounded up to ``multiple``.

    Rounding lets generations of nearby lengths share one cache (and one CUDA graph). It never
    changes the result: decode masks the slots past the current token, and RoPE's base depends
    on the cache length only beyond ``max_position`` (dynamic NTK, :func:`geopixel.llm.rope_base`),
    so the rounded length is capped at ``max_position`` and a length already beyond it is kept
    exact.

    Args:
        needed: Prompt + new tokens.
        max_position: ``max_position_embeddings`` of the model.
        multiple: Rounding step.

    Returns:
        The number of slots, ``>= needed``.
    """
    if needed > max_position:
        return needed
    return min(-(-needed // multiple) * multiple, max_position)


def compile_decode_step(
    *, mode: str | None = "reduce-overhead", backend: str = "inductor", fullgraph: bool = True
) -> DecodeFn:
    """``torch.compile`` of :func:`decode_one_token`, to pass to :func:`generate` as ``decode_fn``.

    The step is compiled with ``dynamic=False``: each (batch, cache length) pair gets its own
    specialised graph (and, with ``mode="reduce-overhead"`` on CUDA, its own captured CUDA graph),
    which is why :func:`generate` rounds cache lengths (:func:`cache_length`). Compiling costs
    tens of seconds per new shape, so it pays off for long answers and many tiles, not for one
    short call. Torch's recompile limit (8 by default) bounds the number of shapes per process;
    past it the step runs eagerly.

    Args:
        mode: Inductor mode (``"reduce-overhead"`` = CUDA graphs, ``"max-autotune"``, None);
            only used with the inductor backend.
        backend: ``"inductor"`` (speed) or a debugging backend such as ``"eager"`` /
            ``"aot_eager"`` (same kernels as eager: the tests use them to check the traced graph).
        fullgraph: Fail on a graph break instead of silently running pieces eagerly.

    Returns:
        A callable with the signature of :func:`decode_one_token`.
    """
    compiled = torch.compile(
        decode_one_token,
        mode=mode if backend == "inductor" else None,
        backend=backend,
        fullgraph=fullgraph,
        dynamic=False,
    )
    return cast(DecodeFn, compiled)


def left_pad(
    inputs_embeds: Sequence[Tensor], im_masks: Sequence[Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Left-pad prompts (L_b, C) into one batch.

    Args:
        inputs_embeds: One (L_b, C) embedding tensor per row.
        im_masks: One (L_b,) image-token mask per row, or None.

    Returns:
        ``(x (B, T, C) with zero pad rows, im_mask (B, T) bool, pad (B,) int64 pad counts)``.
    """
    lens = [int(e.shape[0]) for e in inputs_embeds]
    first = inputs_embeds[0]
    bsz, seqlen = len(lens), max(lens)
    x = first.new_zeros(bsz, seqlen, first.shape[-1])  # (B, T, C)
    im = torch.zeros(bsz, seqlen, dtype=torch.bool, device=first.device)  # (B, T)
    for b, emb in enumerate(inputs_embeds):
        x[b, seqlen - lens[b] :] = emb
        if im_masks is not None:
            im[b, seqlen - lens[b] :] = im_masks[b].to(device=first.device, dtype=torch.bool)
    pad = torch.tensor([seqlen - n for n in lens], dtype=torch.long, device=first.device)
    return x, im, pad


def prefill(
    model: InternLM2,
    inputs_embeds: Tensor,
    *,
    im_mask: Tensor | None,
    pad: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Run the left-padded prompt (B, T, C) from cache slot 0; return last hidden (B, C) and logits (B, V).

    Args:
        model: Decoder with caches set up (at least T slots).
        inputs_embeds: Left-padded prompt embeddings (B, T, C).
        im_mask: Image rows (B, T) bool or None.
        pad: Leading pad count per row (B,), or None when no row is padded (plain causal
            attention, the fast SDPA path).
    """
    seqlen = inputs_embeds.shape[1]
    idx = torch.arange(seqlen, device=inputs_embeds.device)
    positions = idx if pad is None else (idx[None, :] - pad[:, None]).clamp(min=0)  # (T,) | (B, T)
    mask = None if pad is None else padding_mask(idx[None, :] >= pad[:, None])  # (B, 1, T, T)
    hidden = model(inputs_embeds, im_mask=im_mask, positions=positions, attn_mask=mask, input_pos=idx)
    last = hidden[:, -1]  # (B, C)
    return last, model.logits(last)


def decode_one_token(
    model: InternLM2,
    embeds: Tensor,
    *,
    input_pos: Tensor,
    pad: Tensor,
) -> tuple[Tensor, Tensor]:
    """Feed one token per row and return its final-normed hidden (B, C) and logits (B, V).

    Args:
        model: Decoder whose caches hold slots ``< input_pos``.
        embeds: Embeddings of the fed tokens (B, 1, C).
        input_pos: Cache slot (1,) of the fed token (shared by all rows).
        pad: Leading pad count per row (B,); the row's RoPE position is ``input_pos - pad``.
    """
    slots = torch.arange(model.cache_len, device=embeds.device)
    may_attend = (slots[None, :] >= pad[:, None]) & (slots[None, :] <= input_pos)  # (B, S)
    positions = input_pos[None, :] - pad[:, None]  # (B, 1)
    hidden = model(
        embeds,
        positions=positions,
        attn_mask=may_attend[:, None, None, :],
        input_pos=input_pos,
        attend_cache=True,
    )
    last = hidden[:, -1]  # (B, C)
    return last, model.logits(last)


def sample(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row from logits (B, V) on the device (no host sync); greedy at temperature 0."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    # Exponential-race sampling (gpt-fast): argmax(p / Exp(1)) ~ Categorical(p), without a sync.
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)


@torch.no_grad()
def generate(
    model: InternLM2,
    embed_fn: Callable[[Tensor], Tensor] | None,
    inputs_embeds: Tensor | Sequence[Tensor],
    im_mask: Tensor | Sequence[Tensor] | None = None,
    *,
    max_new_tokens: int,
    seg_id: int,
    eos_id: int = 2,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stream_callback: Callable[[list[int]], None] | None = None,
    stop_check_every: int = 8,
    forced_token_ids: Tensor | None = None,
    decode_fn: DecodeFn | None = None,
) -> GenerationOutput:
    """Decode a batch of prompts with the KV cache; keep last-layer hidden states at [SEG] inputs.

    Args:
        model: The decoder.
        embed_fn: Token ids (B, 1) -> embeddings (B, 1, C); None uses ``model.tok_embeddings``.
        inputs_embeds: (B, T, C) for same-length prompts, or one (L_b, C) tensor per row.
        im_mask: Image-token mask matching ``inputs_embeds`` ((B, T) or one (L_b,) per row), or None.
        max_new_tokens: Tokens to generate per row at most (EOS included).
        seg_id: Id of ``[SEG]``.
        eos_id: Stop token (only ``</s>`` in the reference; the model goes on past end-of-turn).
        temperature: 0 is greedy (the reference's setting); > 0 samples.
        top_k: Optional top-k filter when sampling.
        top_p: Optional nucleus filter when sampling.
        generator: RNG for sampling (on the model's device), for reproducible runs.
        stream_callback: Called with each step's new token per row (B ints). This syncs with the
            device every step; leave None for throughput.
        stop_check_every: Steps between host checks of "all rows finished".
        forced_token_ids: Teacher forcing (B, N): feed these tokens instead of sampling (scoring,
            parity tests); N must equal ``max_new_tokens``.
        decode_fn: The decode step; None runs :func:`decode_one_token` eagerly. Pass
            :func:`compile_decode_step`'s result for the compiled (CUDA-graph) step; the prefill
            stays eager (its prompt length changes from call to call).

    Returns:
        Per-row generated ids, [SEG] hidden states and their positions.
    """
    rows = list(inputs_embeds) if not isinstance(inputs_embeds, Tensor) else list(inputs_embeds.unbind(0))
    masks = None if im_mask is None else [m for m in im_mask]
    x, im, pad = left_pad(rows, masks)  # (B, T, C), (B, T), (B,)
    bsz, seqlen, width = x.shape
    if forced_token_ids is not None and forced_token_ids.shape != (bsz, max_new_tokens):
        raise ValueError(f"forced_token_ids must be (B, max_new_tokens) = ({bsz}, {max_new_tokens})")
    embed = embed_fn if embed_fn is not None else model.tok_embeddings
    max_len = cache_length(seqlen + max_new_tokens, max_position=model.config.max_position_embeddings)
    setup_caches(
        model, batch=bsz, max_len=max_len, dtype=x.dtype, device=x.device, static=decode_fn is not None
    )
    tokens = torch.full((bsz, max_new_tokens), eos_id, dtype=torch.long, device=x.device)
    # Static workspace: last-layer hidden at the input position of token k (8 MiB per row for the
    # 7B model at 1024 tokens in bf16); only the [SEG] rows leave this function.
    hidden_buf = x.new_zeros(bsz, max_new_tokens, width)  # (B, N, C)
    done = torch.zeros(bsz, dtype=torch.bool, device=x.device)
    padded = any(n != seqlen for n in (int(r.shape[0]) for r in rows))
    _, logits = prefill(model, x, im_mask=im if masks is not None else None, pad=pad if padded else None)
    input_pos = torch.tensor([seqlen], dtype=torch.long, device=x.device)
    step_fn: DecodeFn = decode_one_token if decode_fn is None else decode_fn
    fed = 0
    for step in range(max_new_tokens):
        if forced_token_ids is not None:
            tok = forced_token_ids[:, step].to(x.device)
        else:
            tok = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        tok = torch.where(done, torch.full_like(tok, eos_id), tok)  # (B,)
        tokens[:, step] = tok
        done = done | (tok == eos_id)
        if stream_callback is not None:
            stream_callback(tok.tolist())
        if step == max_new_tokens - 1 or ((step + 1) % stop_check_every == 0 and bool(done.all())):
            break
        if decode_fn is not None:
            # A CUDA-graph step overwrites its previous outputs on replay; they are consumed
            # (copied into hidden_buf, sampled) before the next call.
            torch.compiler.cudagraph_mark_step_begin()
        hidden, logits = step_fn(model, embed(tok[:, None]), input_pos=input_pos, pad=pad)
        hidden_buf[:, step] = hidden
        input_pos += 1
        fed = step + 1
    return _collect(tokens, hidden_buf, fed=fed, seqlen=seqlen, pad=pad, eos_id=eos_id, seg_id=seg_id)


def _collect(
    tokens: Tensor, hidden_buf: Tensor, *, fed: int, seqlen: int, pad: Tensor, eos_id: int, seg_id: int
) -> GenerationOutput:
    """Cut each row at its first EOS and gather the hidden states of the fed [SEG] tokens (one sync)."""
    ids = tokens.cpu()
    prompt_lengths = [seqlen - int(p) for p in pad.cpu()]
    out = GenerationOutput(token_ids=[], seg_hidden=[], seg_positions=[], prompt_lengths=prompt_lengths)
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        end = row.index(eos_id) + 1 if eos_id in row else len(row)
        row = row[:end]
        keep = [k for k, t in enumerate(row) if t == seg_id and k < fed]
        out.token_ids.append(row)
        out.seg_positions.append([prompt_lengths[b] + k for k in keep])
        out.seg_hidden.append(hidden_buf[b, keep])  # (n_seg, C)
    return out
