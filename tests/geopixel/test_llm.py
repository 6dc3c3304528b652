"""InternLM2 decoder: golden parity with the reference, PLoRA rows, fused wqkv layout, RoPE, RMSNorm."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from geopixel.config import GeoPixelConfig, LLMConfig
from geopixel.llm import (
    Attention,
    InternLM2,
    PLoRALinear,
    RMSNorm,
    gqa_attention,
    llm_state_dict,
    padding_mask,
    rope_base,
    rope_cos_sin,
)
from safetensors.torch import load_file

CASES = ["rrsis_img_800x800_hd9", "gcg_img_800x800_hd9", "rrsis_img_1000x600_hd4", "gcg_img_1000x600_hd4"]
TOL = {"atol": 1e-4, "rtol": 1e-4}  # README §6: fp32 LLM tensors and logits


@pytest.fixture(scope="module")
def golden_llm(golden_dir: Path) -> InternLM2:
    cfg = GeoPixelConfig.from_dir(golden_dir).llm
    model = InternLM2(cfg).eval()
    model.load_state_dict(llm_state_dict(load_file(golden_dir / "model.safetensors")), strict=True)
    return model


def random_llm(cfg: LLMConfig, seed: int = 0) -> InternLM2:
    """Tiny model with the golden init recipe: every weight (Plora_B included) non-trivial."""
    model = InternLM2(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            else:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    return model


def test_state_dict_keys_are_released_llm_keys(golden_dir: Path) -> None:
    released = load_file(golden_dir / "model.safetensors")
    model = InternLM2(GeoPixelConfig.from_dir(golden_dir).llm)
    ours = set(model.state_dict())
    expected = {k.removeprefix("model.") for k in released if k.startswith(("model.layers.", "model.norm."))}
    expected |= {"tok_embeddings.weight", "output.weight"}
    expected = {k for k in expected if not any(a in k for a in ("lora_sft", "lora_dpo", "lora_web"))}
    assert ours == expected
    assert "layers.1.attention.wqkv.Plora_B.weight" in ours
    # KV caches never leak into the state dict.
    model.setup_caches(batch=1, max_len=4, dtype=torch.float32, device=torch.device("cpu"))
    assert set(model.state_dict()) == ours


@pytest.mark.parametrize("case", CASES)
def test_prompt_forward_matches_reference(golden_llm: InternLM2, golden_dir: Path, case: str) -> None:
    g = load_file(golden_dir / f"chat_{case}.safetensors")
    with torch.no_grad():
        states = golden_llm.hidden_states(g["inputs_embeds"][None], im_mask=g["im_mask"][None].bool())
        hidden = states[-1][0]
        logits = golden_llm.logits(hidden[-1])
    err_h = (hidden - g["hidden_last_layer"]).abs().max().item()
    err_l = (logits - g["logits_last"]).abs().max().item()
    print(f"{case}: hidden_last_layer max abs err {err_h:.2e}, logits_last {err_l:.2e}")
    torch.testing.assert_close(hidden, g["hidden_last_layer"], **TOL)
    torch.testing.assert_close(logits, g["logits_last"], **TOL)
    if "hidden_all_layers" in g:
        ours = torch.stack([s[0] for s in states])
        print(
            f"{case}: hidden_all_layers max abs err {(ours - g['hidden_all_layers']).abs().max().item():.2e}"
        )
        torch.testing.assert_close(ours, g["hidden_all_layers"], **TOL)


@pytest.mark.parametrize("case", CASES)
def test_teacher_forced_full_forward_matches_reference(
    golden_llm: InternLM2, golden_dir: Path, case: str
) -> None:
    chat = load_file(golden_dir / f"chat_{case}.safetensors")
    tf = load_file(golden_dir / f"tf_{case}.safetensors")
    answer = tf["forced_token_ids"][:-1]  # the last forced token is never fed
    with torch.no_grad():
        x = torch.cat([chat["inputs_embeds"], golden_llm.tok_embeddings(answer)])[None]
        im = torch.cat([chat["im_mask"].bool(), torch.zeros(len(answer), dtype=torch.bool)])[None]
        hidden = golden_llm(x, im_mask=im)[0]
    err = (hidden - tf["hidden_last_layer_full"]).abs().max().item()
    print(f"{case}: hidden_last_layer_full max abs err {err:.2e}")
    torch.testing.assert_close(hidden, tf["hidden_last_layer_full"], **TOL)


def test_plora_adds_adapter_only_on_image_rows() -> None:
    torch.manual_seed(0)
    lin = PLoRALinear(16, 24, r=4, alpha=8).eval()
    torch.nn.init.normal_(lin.Plora_B.weight)
    x = torch.randn(2, 7, 16)
    im = torch.zeros(2, 7, dtype=torch.bool)
    im[0, 2:5] = True
    im[1, 0] = True
    y = lin(x, im)
    base = F.linear(x, lin.weight)
    adapter = lin.Plora_B(lin.Plora_A(x)) * 2.0  # alpha / r
    assert torch.equal(y[~im], base[~im])
    torch.testing.assert_close(y[im], base[im] + adapter[im])
    assert (y[im] - base[im]).abs().min() > 0
    assert torch.equal(lin(x, None), base)


def test_plora_model_level_and_skip_without_image_tokens(golden_dir: Path) -> None:
    model = random_llm(GeoPixelConfig.from_dir(golden_dir).llm)
    x = torch.randn(1, 10, model.config.hidden_size)
    im = torch.zeros(1, 10, dtype=torch.bool)
    im[0, 4:8] = True
    with torch.no_grad():
        with_img, without = model(x, im_mask=im)[0], model(x)[0]
    assert torch.equal(with_img[:4], without[:4])  # causal: rows before the image are untouched
    assert (with_img[4:] - without[4:]).abs().amax(-1).min() > 1e-3
    calls: list[int] = []
    hook = model.layers[0].attention.wqkv.Plora_A.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        all_false = model(x, im_mask=torch.zeros_like(im))[0]
    hook.remove()
    assert calls == []  # no adapter matmul at all when there is no image token
    assert torch.equal(all_false, without)


def eager_attention(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Oracle: split wqkv by the documented (kv_heads, groups + 2, head_dim) rule, repeat_kv, fp32 softmax."""
    cfg = attn.config
    g, hd, kvh = cfg.num_groups, cfg.head_dim, cfg.num_kv_heads
    w = attn.wqkv.weight.view(kvh, g + 2, hd, cfg.hidden_size)
    wq, wk, wv = w[:, :g].reshape(-1, cfg.hidden_size), w[:, g], w[:, g + 1]
    wk, wv = wk.reshape(-1, cfg.hidden_size), wv.reshape(-1, cfg.hidden_size)
    bsz, seqlen, _ = x.shape
    q = (x @ wq.T).view(bsz, seqlen, cfg.num_heads, hd).transpose(1, 2)
    k = (x @ wk.T).view(bsz, seqlen, kvh, hd).transpose(1, 2)
    v = (x @ wv.T).view(bsz, seqlen, kvh, hd).transpose(1, 2)

    def rot(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([-t[..., hd // 2 :], t[..., : hd // 2]], -1)

    q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # query head h uses kv head h // g
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).float().softmax(-1).to(q.dtype)
    y = (probs @ v).transpose(1, 2).reshape(bsz, seqlen, -1)
    return y @ attn.wo.weight.T


def test_fused_wqkv_layout_matches_eager_oracle(golden_llm: InternLM2) -> None:
    attn = golden_llm.layers[1].attention
    torch.manual_seed(1)
    x = torch.randn(2, 9, golden_llm.config.hidden_size)
    cos, sin = rope_cos_sin(torch.arange(9), golden_llm.config, total_len=9, dtype=x.dtype)
    with torch.no_grad():
        ours = attn(x, cos, sin, im_mask=None, attn_mask=None, input_pos=None, attend_cache=False)
        oracle = eager_attention(attn, x, cos, sin)
    torch.testing.assert_close(ours, oracle, atol=1e-5, rtol=1e-5)


def test_rmsnorm_casts_back_before_weight() -> None:
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 8).to(torch.bfloat16).float())
    norm = norm.to(torch.bfloat16)
    x = (torch.randn(3, 8) * 4).to(torch.bfloat16)
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(norm(x), norm.weight * normed)


def test_rope_base_is_a_pure_function_of_length() -> None:
    cfg = GeoPixelConfig.from_name("geopixel-7b").llm
    assert rope_base(cfg, 16384) == cfg.rope_theta
    assert rope_base(cfg, cfg.max_position_embeddings) == cfg.rope_theta
    n = 30000
    expected = cfg.rope_theta * ((2.0 * n / cfg.max_position_embeddings) - 1) ** (128 / 126)
    assert rope_base(cfg, n) == pytest.approx(expected, rel=1e-12)
    assert rope_base(cfg, n) == rope_base(cfg, n)  # no state carried between calls
    assert rope_base(cfg, 100) == cfg.rope_theta


def test_rope_tables_match_reference_formula() -> None:
    cfg = GeoPixelConfig.from_name("tiny").llm
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2).float() / d))
    table = torch.einsum("i,j->ij", torch.arange(50).float(), inv_freq)
    emb = torch.cat([table, table], -1)
    pos = torch.tensor([[0, 3, 49], [7, 7, 1]])
    cos, sin = rope_cos_sin(pos, cfg, total_len=50, dtype=torch.float32)
    assert torch.equal(cos[:, 0], emb.cos()[pos]) and torch.equal(sin[:, 0], emb.sin()[pos])


def test_gradient_checkpointing_same_loss_and_grads(golden_dir: Path) -> None:
    model = random_llm(GeoPixelConfig.from_dir(golden_dir).llm).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x = torch.randn(2, 6, model.config.hidden_size)
    im = torch.zeros(2, 6, dtype=torch.bool)
    im[:, 1:3] = True
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(x, im_mask=im).square().sum().backward()
        grads.append(model.layers[0].attention.wqkv.Plora_B.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_right_and_left_padded_batches_equal_single_rows(golden_dir: Path) -> None:
    model = random_llm(GeoPixelConfig.from_dir(golden_dir).llm)
    torch.manual_seed(2)
    lens, width = (8, 5), model.config.hidden_size
    rows = [torch.randn(n, width) for n in lens]
    ims = [torch.arange(n) < 3 for n in lens]
    with torch.no_grad():
        singles = [model(r[None], im_mask=m[None])[0] for r, m in zip(rows, ims, strict=True)]
        # Right padding (training): real tokens first, default positions 0..T-1.
        x = torch.zeros(2, 8, width)
        im = torch.zeros(2, 8, dtype=torch.bool)
        valid = torch.zeros(2, 8, dtype=torch.bool)
        for b, n in enumerate(lens):
            x[b, :n], im[b, :n], valid[b, :n] = rows[b], ims[b], True
        right = model(x, im_mask=im, attn_mask=padding_mask(valid))
        # Left padding (generation): per-row positions start at the first real token.
        pad = torch.tensor([8 - n for n in lens])
        xl, iml, validl = (
            torch.stack([t.roll(int(p), 0) for t, p in zip(z, pad, strict=True)]) for z in (x, im, valid)
        )
        positions = (torch.arange(8)[None] - pad[:, None]).clamp(min=0)
        left = model(xl, im_mask=iml, positions=positions, attn_mask=padding_mask(validl))
    for b, n in enumerate(lens):
        torch.testing.assert_close(right[b, :n], singles[b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(left[b, 8 - n :], singles[b], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(right).all() and torch.isfinite(left).all()


def _old_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, g: int
) -> torch.Tensor:
    """The previous call: ``enable_gqa`` with or without a mask (math kernel on CUDA when masked)."""
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=g > 1)
    return y.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa_attention_equals_enable_gqa_sdpa_for_decode_padded_and_plain_prefill(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    bsz, kvh, g, hd, seqlen, slots = 3, 2, 4, 16, 7, 12

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    k, v = rand(bsz, kvh, slots, hd), rand(bsz, kvh, slots, hd)
    pad = torch.tensor([0, 2, 5])
    # Decode: one query against the cache, rows masked at their pads and past the current slot.
    q1 = rand(bsz, kvh * g, 1, hd)
    s = torch.arange(slots)
    may = ((s[None] >= pad[:, None]) & (s[None] <= 9))[:, None, None, :]  # (B, 1, 1, S)
    ours, old = gqa_attention(q1, k, v, attn_mask=may, groups=g), _old_sdpa(q1, k, v, may, g)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(ours, old, **tol)
    # Padded prefill: left-padded causal mask over this call's keys.
    q, kp, vp = rand(bsz, kvh * g, seqlen, hd), k[:, :, :seqlen], v[:, :, :seqlen]
    mask = padding_mask(torch.arange(seqlen)[None] >= pad[:, None])  # (B, 1, T, T)
    ours = gqa_attention(q, kp, vp, attn_mask=mask, groups=g)
    torch.testing.assert_close(ours, _old_sdpa(q, kp, vp, mask, g), **tol)
    # Unpadded prefill: unchanged call.
    assert torch.equal(gqa_attention(q, kp, vp, attn_mask=None, groups=g), _old_sdpa(q, kp, vp, None, g))


def test_no_sdpa_call_combines_enable_gqa_with_a_mask(
    golden_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode and padded prefill must not take the math-only ``enable_gqa`` + mask route."""
    from geopixel.generate import generate

    model = random_llm(GeoPixelConfig.from_dir(golden_dir).llm)
    calls: list[tuple[bool, bool, int]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> torch.Tensor:
        calls.append((kw.get("attn_mask") is not None, bool(kw.get("enable_gqa", False)), q.shape[1]))
        return sdpa(q, k, v, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    rows = [torch.randn(n, model.config.hidden_size) for n in (6, 9)]
    generate(model, None, rows, max_new_tokens=3, seg_id=0)
    masked = [c for c in calls if c[0]]
    assert masked and not any(gqa for _, gqa, _ in masked)
    heads, kvh = model.config.num_heads, model.config.num_kv_heads
    assert {h for _, _, h in masked} == {heads, kvh}  # padded prefill (H heads), decode (folded: kvh)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks which SDPA kernels run there")
def test_cuda_decode_and_prefill_need_no_math_kernel() -> None:
    """With only the flash and memory-efficient kernels allowed, a math fallback raises."""
    from geopixel.generate import generate
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # Head width 64 (the kernels' alignment rules); 8 query heads on 2 KV heads as in the 7B model.
    cfg = LLMConfig(vocab_size=128, hidden_size=512, num_layers=2, num_heads=8, num_kv_heads=2,
                    intermediate_size=256, plora_r=4, plora_alpha=4)
    model = random_llm(cfg).to("cuda", torch.bfloat16)
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randn(n, cfg.hidden_size, generator=gen).to("cuda", torch.bfloat16) for n in (37, 50)]
    forced = torch.randint(3, 128, (2, 6), generator=gen)
    kw = {"max_new_tokens": 6, "seg_id": 4, "forced_token_ids": forced}
    reference = generate(model, None, rows, **kw)  # default kernel choice
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        padded = generate(model, None, rows, **kw)  # padded prefill + masked decode
        single = generate(model, None, rows[1:], **{**kw, "forced_token_ids": forced[1:]})  # unpadded
    assert padded.token_ids == reference.token_ids == forced.tolist()
    forced_seg = torch.tensor([[5, 4, 6, 4, 7, 2]] * 2)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        segs = generate(model, None, rows, **{**kw, "forced_token_ids": forced_seg})
    eager = generate(model, None, rows, **{**kw, "forced_token_ids": forced_seg})
    for ours, ref in zip(segs.seg_hidden, eager.seg_hidden, strict=True):
        assert ours.shape == (2, cfg.hidden_size) and torch.isfinite(ours).all()
        torch.testing.assert_close(ours.float(), ref.float(), atol=5e-2, rtol=5e-2)
    assert single.token_ids == forced[1:].tolist()
