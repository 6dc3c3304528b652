"""Cached decoding: reference greedy tokens, teacher-forced steps, [SEG] bookkeeping, batching, sampling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from geopixel.config import GeoPixelConfig
from geopixel.generate import (
    cache_length,
    compile_decode_step,
    decode_one_token,
    generate,
    prefill,
    sample,
    setup_caches,
)
from geopixel.llm import InternLM2, llm_state_dict, rope_base
from safetensors.torch import load_file

CASES = ["rrsis_img_800x800_hd9", "gcg_img_800x800_hd9", "rrsis_img_1000x600_hd4", "gcg_img_1000x600_hd4"]
TOL = {"atol": 1e-4, "rtol": 1e-4}
SEG, EOS = 92550, 2


@pytest.fixture(scope="module")
def golden_llm(golden_dir: Path) -> InternLM2:
    cfg = GeoPixelConfig.from_dir(golden_dir)
    assert cfg.seg_token_id == SEG and cfg.llm.eos_token_id == EOS
    model = InternLM2(cfg.llm).eval()
    model.load_state_dict(llm_state_dict(load_file(golden_dir / "model.safetensors")), strict=True)
    return model


@pytest.fixture(scope="module")
def tiny_llm(golden_dir: Path) -> InternLM2:
    """Random-weight model of the fixture's sizes (golden init recipe: adapters non-zero)."""
    model = InternLM2(GeoPixelConfig.from_dir(golden_dir).llm).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            scale = 1 / math.sqrt(p[0].numel()) if p.dim() >= 2 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (0 if p.dim() >= 2 else 1))
    return model


def prompt(model: InternLM2, length: int, seed: int, image: slice) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(length, model.config.hidden_size, generator=gen)
    im = torch.zeros(length, dtype=torch.bool)
    im[image] = True
    return x, im


def full_hidden(model: InternLM2, x: torch.Tensor, im: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Reference-style recomputation: prompt + embeddings of ``tokens``, no cache. Returns (L, C)."""
    with torch.no_grad():
        ids = torch.tensor(tokens, dtype=torch.long)
        seq = torch.cat([x, model.tok_embeddings(ids)])[None]
        mask = torch.cat([im, torch.zeros(len(tokens), dtype=torch.bool)])[None]
        return model(seq, im_mask=mask)[0]


@pytest.mark.parametrize("case", CASES)
def test_greedy_tokens_match_reference(golden_llm: InternLM2, golden_dir: Path, case: str) -> None:
    g = load_file(golden_dir / f"chat_{case}.safetensors")
    expected = json.loads((golden_dir / f"chat_{case}.json").read_text())["generation"]["new_token_ids"]
    out = generate(
        golden_llm, None, g["inputs_embeds"][None], g["im_mask"][None].bool(), max_new_tokens=16, seg_id=SEG
    )
    assert out.token_ids == [expected]
    assert out.prompt_lengths == [g["inputs_embeds"].shape[0]]


@pytest.mark.parametrize("case", CASES)
def test_teacher_forced_steps_match_reference(golden_llm: InternLM2, golden_dir: Path, case: str) -> None:
    g = load_file(golden_dir / f"chat_{case}.safetensors")
    tf = load_file(golden_dir / f"tf_{case}.safetensors")
    forced = tf["forced_token_ids"]
    x, im = g["inputs_embeds"][None], g["im_mask"][None].bool()
    # Step k's logits come from prefill (k = 0) or from feeding forced[k - 1] at slot T + k - 1.
    setup_caches(golden_llm, batch=1, max_len=x.shape[1] + len(forced), dtype=x.dtype, device="cpu")
    step_logits = []
    with torch.no_grad():
        _, logits = prefill(golden_llm, x, im_mask=im, pad=None)
        pad, pos = torch.zeros(1, dtype=torch.long), torch.tensor([x.shape[1]])
        for k in range(len(forced)):
            step_logits.append(logits[0])
            if k < len(forced) - 1:
                emb = golden_llm.tok_embeddings(forced[k].view(1, 1))
                _, logits = decode_one_token(golden_llm, emb, input_pos=pos, pad=pad)
                pos += 1
    lg = torch.stack(step_logits)  # (N, V)
    forced_logit = lg.gather(1, forced[:, None])[:, 0]
    lse = lg.logsumexp(-1)
    err = max((forced_logit - tf["step_forced_logit"]).abs().max(), (lse - tf["step_logsumexp"]).abs().max())
    out = generate(
        golden_llm, None, x, im, max_new_tokens=len(forced), seg_id=SEG, forced_token_ids=forced[None]
    )
    seg_err = (out.seg_hidden[0] - tf["seg_hidden"]).abs().max().item()
    print(f"{case}: step logit/logsumexp max abs err {err.item():.2e}, seg_hidden {seg_err:.2e}")
    torch.testing.assert_close(forced_logit, tf["step_forced_logit"], **TOL)
    torch.testing.assert_close(lse, tf["step_logsumexp"], **TOL)
    assert out.token_ids == [forced.tolist()] and forced[-1] == EOS
    assert out.seg_positions == [tf["seg_positions"].tolist()]
    torch.testing.assert_close(out.seg_hidden[0], tf["seg_hidden"], **TOL)


def test_cached_decoding_equals_full_recomputation(tiny_llm: InternLM2) -> None:
    x, im = prompt(tiny_llm, 13, seed=1, image=slice(1, 9))
    setup_caches(tiny_llm, batch=1, max_len=13 + 6, dtype=x.dtype, device="cpu")
    tokens: list[int] = []
    with torch.no_grad():
        hidden, logits = prefill(tiny_llm, x[None], im_mask=im[None], pad=None)
        pad, pos = torch.zeros(1, dtype=torch.long), torch.tensor([13])
        for _ in range(6):
            full = full_hidden(tiny_llm, x, im, tokens)
            torch.testing.assert_close(hidden[0], full[-1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(logits[0], tiny_llm.logits(full[-1]), atol=1e-5, rtol=1e-5)
            tokens.append(int(logits[0].argmax()))
            emb = tiny_llm.tok_embeddings(torch.tensor([[tokens[-1]]]))
            hidden, logits = decode_one_token(tiny_llm, emb, input_pos=pos, pad=pad)
            pos += 1
    out = generate(tiny_llm, None, x[None], im[None], max_new_tokens=6, seg_id=SEG)
    assert out.token_ids == [tokens]


def test_seg_hidden_kept_at_seg_input_positions(tiny_llm: InternLM2) -> None:
    x, im = prompt(tiny_llm, 10, seed=2, image=slice(1, 6))
    forced = [11, SEG, 12, SEG, 13, SEG]  # the final [SEG] is never fed: ignored
    out = generate(
        tiny_llm, None, [x], [im], max_new_tokens=6, seg_id=SEG, forced_token_ids=torch.tensor([forced])
    )
    assert out.token_ids == [forced]
    assert out.seg_positions == [[10 + 1, 10 + 3]]
    full = full_hidden(tiny_llm, x, im, forced[:-1])
    torch.testing.assert_close(out.seg_hidden[0], full[[11, 13]], atol=1e-5, rtol=1e-5)
    # A row stops at its first EOS; [SEG]s after it do not count.
    out = generate(
        tiny_llm,
        None,
        [x],
        [im],
        max_new_tokens=5,
        seg_id=SEG,
        forced_token_ids=torch.tensor([[SEG, 9, EOS, SEG, 9]]),
    )
    assert out.token_ids == [[SEG, 9, EOS]] and out.seg_positions == [[10]]


def test_batch_of_different_lengths_equals_single_runs(tiny_llm: InternLM2) -> None:
    rows = [prompt(tiny_llm, n, seed=10 + n, image=slice(1, n - 3)) for n in (9, 15, 6)]
    xs, ims = [r[0] for r in rows], [r[1] for r in rows]
    batch = generate(tiny_llm, None, xs, ims, max_new_tokens=5, seg_id=SEG)
    singles = [generate(tiny_llm, None, [x], [m], max_new_tokens=5, seg_id=SEG) for x, m in rows]
    assert batch.token_ids == [s.token_ids[0] for s in singles]
    assert batch.prompt_lengths == [9, 15, 6]
    forced = torch.tensor([[5, SEG, 6, SEG, 7, 8], [SEG, 4, EOS, SEG, 1, 1], [3, 3, 3, 3, SEG, 4]])
    batch = generate(tiny_llm, None, xs, ims, max_new_tokens=6, seg_id=SEG, forced_token_ids=forced)
    assert batch.token_ids == [forced[0].tolist(), [SEG, 4, EOS], forced[2].tolist()]
    assert batch.seg_positions == [[10, 12], [15], [10]]
    for b, (x, m) in enumerate(rows):
        single = generate(
            tiny_llm, None, [x], [m], max_new_tokens=6, seg_id=SEG, forced_token_ids=forced[b : b + 1]
        )
        assert single.seg_positions[0] == batch.seg_positions[b]
        torch.testing.assert_close(batch.seg_hidden[b], single.seg_hidden[0], atol=1e-5, rtol=1e-5)


def test_sampling_filters_and_seed() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    greedy = sample(logits)
    assert torch.equal(sample(logits, temperature=1.0, top_k=1), greedy)
    assert torch.equal(sample(logits, temperature=1.0, top_p=1e-6), greedy)
    draws = [sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    many = torch.stack([sample(logits, temperature=1.0, top_k=3) for _ in range(200)])
    top3 = logits.topk(3, dim=-1).indices
    assert all(set(many[:, b].tolist()) <= set(top3[b].tolist()) for b in range(4))


def test_stream_callback_and_periodic_stop_check(tiny_llm: InternLM2) -> None:
    x, im = prompt(tiny_llm, 8, seed=3, image=slice(1, 5))
    forced = torch.tensor([[EOS] + [7] * 9, [7, EOS] + [7] * 8])
    for every, expected_steps in ((1, 2), (4, 4)):
        seen: list[list[int]] = []
        out = generate(
            tiny_llm,
            None,
            [x, x],
            [im, im],
            max_new_tokens=10,
            seg_id=SEG,
            forced_token_ids=forced,
            stream_callback=seen.append,
            stop_check_every=every,
        )
        assert out.token_ids == [[EOS], [7, EOS]]
        assert len(seen) == expected_steps and seen[0] == [EOS, 7] and seen[1] == [EOS, EOS]


@pytest.mark.slow  # dynamo tracing takes ~10 s on 2 CPU cores
def test_decode_one_token_traces_without_graph_breaks(tiny_llm: InternLM2) -> None:
    x, _ = prompt(tiny_llm, 7, seed=4, image=slice(0, 0))
    pad = torch.tensor([0, 2])
    setup_caches(tiny_llm, batch=2, max_len=10, dtype=x.dtype, device="cpu")
    step = torch.compile(decode_one_token, fullgraph=True, backend="eager")  # fullgraph: no .item() etc.
    with torch.no_grad():
        _, logits = prefill(tiny_llm, torch.stack([x, x]), im_mask=None, pad=pad)
        emb = tiny_llm.tok_embeddings(logits.argmax(-1)[:, None])
        pos = torch.tensor([7])
        compiled = step(tiny_llm, emb, input_pos=pos, pad=pad)
        eager = decode_one_token(tiny_llm, emb, input_pos=pos, pad=pad)
    torch.testing.assert_close(compiled, eager)


def test_cache_length_rounds_up_without_changing_rope() -> None:
    cfg = GeoPixelConfig.from_name("geopixel-7b").llm
    top = cfg.max_position_embeddings  # 24576
    assert cache_length(4145 + 1024, max_position=top) == 5376  # 21 x 256
    assert cache_length(256, max_position=top) == 256 and cache_length(1, max_position=top) == 256
    assert cache_length(top - 10, max_position=top) == top  # capped: RoPE base still theta
    assert cache_length(top + 1, max_position=top) == top + 1  # dynamic NTK: exact length kept
    for needed in (7, 5169, top - 10, top, top + 1, 30000):
        assert rope_base(cfg, cache_length(needed, max_position=top)) == rope_base(cfg, needed)


def test_compiled_decode_step_gives_the_eager_tokens_and_seg_hidden(tiny_llm: InternLM2) -> None:
    rows = [prompt(tiny_llm, n, seed=20 + n, image=slice(1, n - 3)) for n in (9, 14)]
    xs, ims = [r[0] for r in rows], [r[1] for r in rows]
    forced = torch.tensor([[5, SEG, 6, SEG, 7, 8], [SEG, 4, 9, SEG, 1, EOS]])
    calls: list[int] = []
    compiled = compile_decode_step(backend="aot_eager")  # the traced graph, eager kernels: bitwise equal

    def counted(
        model: InternLM2, embeds: torch.Tensor, *, input_pos: torch.Tensor, pad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(int(input_pos))
        return compiled(model, embeds, input_pos=input_pos, pad=pad)

    kw = {"max_new_tokens": 6, "seg_id": SEG, "forced_token_ids": forced}
    eager = generate(tiny_llm, None, xs, ims, **kw)
    fast = generate(tiny_llm, None, xs, ims, decode_fn=counted, **kw)
    assert calls == [14, 15, 16, 17, 18]  # every step after prefill went through decode_fn
    assert fast.token_ids == eager.token_ids
    assert fast.seg_positions == eager.seg_positions == [[10, 12], [14, 17]]
    for a, b in zip(fast.seg_hidden, eager.seg_hidden, strict=True):
        assert torch.equal(a, b)
    greedy = generate(tiny_llm, None, xs, ims, max_new_tokens=8, seg_id=SEG)
    assert generate(tiny_llm, None, xs, ims, max_new_tokens=8, seg_id=SEG, decode_fn=compiled).token_ids == (
        greedy.token_ids
    )


def test_caches_are_reused_across_calls_and_stale_slots_do_not_leak(tiny_llm: InternLM2) -> None:
    long_x, long_im = prompt(tiny_llm, 40, seed=30, image=slice(1, 30))
    x, im = prompt(tiny_llm, 12, seed=31, image=slice(1, 8))
    tiny_llm.clear_caches()
    fresh = generate(tiny_llm, None, [x], [im], max_new_tokens=6, seg_id=SEG)
    generate(tiny_llm, None, [long_x], [long_im], max_new_tokens=30, seg_id=SEG)  # fills 70 slots
    cache = tiny_llm.layers[0].attention.kv_cache
    assert cache is not None and tiny_llm.cache_len == 256
    again = generate(tiny_llm, None, [x], [im], max_new_tokens=6, seg_id=SEG)  # same 256-slot cache
    assert tiny_llm.layers[0].attention.kv_cache is cache
    assert again.token_ids == fresh.token_ids
    generate(tiny_llm, None, [x, x], [im, im], max_new_tokens=6, seg_id=SEG)  # new batch size: new cache
    assert tiny_llm.layers[0].attention.kv_cache is not cache
    tiny_llm.clear_caches()


def test_caches_made_under_inference_mode_are_not_reused_outside_it(tiny_llm: InternLM2) -> None:
    """``GeoPixel.describe`` runs under inference mode; a later plain ``generate`` must not crash."""
    x, im = prompt(tiny_llm, 12, seed=32, image=slice(1, 8))
    tiny_llm.clear_caches()
    with torch.inference_mode():
        inside = generate(tiny_llm, None, [x], [im], max_new_tokens=5, seg_id=SEG)
    assert tiny_llm.layers[0].attention.kv_cache.k_cache.is_inference()  # type: ignore[union-attr]
    outside = generate(tiny_llm, None, [x], [im], max_new_tokens=5, seg_id=SEG)  # no in-place error
    assert not tiny_llm.layers[0].attention.kv_cache.k_cache.is_inference()  # type: ignore[union-attr]
    cache = tiny_llm.layers[0].attention.kv_cache
    assert generate(tiny_llm, None, [x], [im], max_new_tokens=5, seg_id=SEG).token_ids == outside.token_ids
    assert tiny_llm.layers[0].attention.kv_cache is cache  # same mode again: reused
    assert outside.token_ids == inside.token_ids
    tiny_llm.clear_caches()
