"""End-to-end parity of GeoPixel (loaded from the golden checkpoint dir) with the reference outputs.

Tolerances follow the golden README §6: fp32 LLM/vision tensors and logits 1e-4; token ids, layouts,
decoded text and the multimask choice exactly; final mask logits (stored as fp16, behind a bf16 cast of
the SAM image embedding) atol 5e-2 with positive-pixel fractions to 1e-3.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from geopixel import GeoPixel, GeoPixelResult
from geopixel.modeling import load_image
from geopixel.tokenizer import GCG_QUERY, RES_ANSWER, RRSIS_TEMPLATE
from safetensors.torch import load_file

CASES = ["gcg_img_800x800_hd9", "gcg_img_1000x600_hd4", "rrsis_img_800x800_hd9", "rrsis_img_1000x600_hd4"]


@pytest.fixture(scope="module")
def model(golden_dir: Path) -> GeoPixel:
    return GeoPixel.from_pretrained(golden_dir, device="cpu", dtype="fp32")


def _case(golden_dir: Path, kind: str, case: str) -> tuple[dict, dict[str, torch.Tensor], np.ndarray]:
    meta = json.loads((golden_dir / f"{kind}_{case}.json").read_text())
    return meta, load_file(golden_dir / f"{kind}_{case}.safetensors"), load_image(golden_dir / meta["image"])


def _close(ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-4, rtol: float = 1e-4) -> float:
    err = (ours.float() - ref.float()).abs().max().item()
    torch.testing.assert_close(ours.float(), ref.float(), atol=atol, rtol=rtol)
    return err


@pytest.mark.parametrize("case", CASES)
def test_chat_golden_prompt_logits_and_greedy_answer(model: GeoPixel, golden_dir: Path, case: str) -> None:
    meta, gold, image = _case(golden_dir, "chat", case)
    hd = meta["hd_num"]
    with torch.inference_mode():
        prompt = model.build_prompts([image], [meta["query"]], hd_num=hd, max_new_tokens=16)[0]
        hidden = model.llm(prompt.embeds[None], im_mask=prompt.im_mask[None])[0]  # (L, C)
        logits = model.llm.logits(hidden[-1])
    assert prompt.layout == gold["input_ids_layout"].tolist()
    assert torch.equal(prompt.im_mask, gold["im_mask"].bool())
    _close(prompt.embeds, gold["inputs_embeds"])
    _close(hidden, gold["hidden_last_layer"])
    _close(logits, gold["logits_last"])

    gen = meta["generation"]
    if case.startswith("gcg"):
        assert meta["query"] == GCG_QUERY
        result = model.describe(image, hd_num=hd, max_new_tokens=16)
    else:
        assert meta["query"] == RRSIS_TEMPLATE.format("red car")
        result = model.segment(image, "red car", hd_num=hd, max_new_tokens=16)
    assert result.token_ids == gen["new_token_ids"]
    assert result.text == gen["evaluate_response"]
    assert result.masks.shape == (0, *image.shape[:2]) and result.phrases == []  # no [SEG] generated


@pytest.mark.parametrize("case", CASES)
def test_teacher_forced_golden_seg_embeddings_and_masks(model: GeoPixel, golden_dir: Path, case: str) -> None:
    meta, gold, image = _case(golden_dir, "tf", case)
    forced = gold["forced_token_ids"][None]  # (1, N) the reference's forced answer, ending with </s>
    result = model._run(
        [image], [meta["query"]], hd_num=meta["hd_num"], max_new_tokens=forced.shape[1],
        forced_token_ids=forced, keep_mask_logits=True,
    )[0]
    assert result.token_ids == gold["forced_token_ids"].tolist()
    assert result.text == meta["evaluate_response"]
    _close(torch.from_numpy(result.seg_hidden), gold["seg_hidden"])
    selected_iou = np.array(meta["dynamic_multimask"]["selected_iou"])[:, 0]
    np.testing.assert_allclose(result.scores, selected_iou, atol=1e-4)
    assert result.mask_logits is not None
    logits = torch.from_numpy(result.mask_logits)
    if "pred_masks" in gold:
        _close(logits, gold["pred_masks"], atol=5e-2, rtol=0)
    else:  # gcg/1000x600 stores rows 0, 100, 250 and H-1 only
        _close(logits[:, [0, 100, 250, -1]], gold["pred_masks_rows_0_100_250_end"], atol=5e-2, rtol=0)
    assert np.array_equal(result.masks, result.mask_logits > 0)
    np.testing.assert_allclose(result.masks.mean((1, 2)), meta["pred_masks_positive_fraction"], atol=1e-3)
    assert [p.mask_index for p in result.phrases] == list(range(len(result.phrases)))
    if case.startswith("gcg"):
        assert [p.text for p in result.phrases] == ["a red car", "a white building", "green trees"]
        assert all(result.text[p.start : p.end] == p.text for p in result.phrases)


def _forced_answer(model: GeoPixel, n: int) -> torch.Tensor:
    assert model.tokenizer is not None
    ids = model.tokenizer.answer_ids(RES_ANSWER)  # Sure, it is [SEG].[UNUSED_TOKEN_145]\n</s>
    return torch.tensor([ids] * n)


def test_batch_of_three_images_equals_three_single_runs(model: GeoPixel, golden_dir: Path) -> None:
    names = ["img_800x800.png", "img_1000x600.png", "img_600x1400.png"]
    images = [load_image(golden_dir / "images" / n) for n in names]
    queries = [RRSIS_TEMPLATE.format(e) for e in ("red car", "the white building", "trees")]
    forced = _forced_answer(model, 3)
    kw = {"hd_num": 1, "max_new_tokens": forced.shape[1], "keep_mask_logits": True}
    batch = model._run(images, queries, forced_token_ids=forced, **kw)
    for b, (image, query) in enumerate(zip(images, queries, strict=True)):
        single = model._run([image], [query], forced_token_ids=forced[b : b + 1], **kw)[0]
        _check_same(batch[b], single, image.shape[:2])
    greedy = model.describe_batch(images, hd_num=1, max_new_tokens=6)
    for image, result in zip(images, greedy, strict=True):
        assert result.token_ids == model.describe(image, hd_num=1, max_new_tokens=6).token_ids


def _check_same(ours: GeoPixelResult, ref: GeoPixelResult, hw: tuple[int, int]) -> None:
    assert ours.token_ids == ref.token_ids and ours.text == ref.text
    assert ours.masks.shape == ref.masks.shape == (1, *hw) and ours.masks.dtype == np.bool_
    _close(torch.from_numpy(ours.seg_hidden), torch.from_numpy(ref.seg_hidden))
    np.testing.assert_allclose(ours.scores, ref.scores, atol=1e-3)
    assert ours.mask_logits is not None and ref.mask_logits is not None
    np.testing.assert_allclose(ours.mask_logits, ref.mask_logits, atol=5e-2)
    assert (ours.masks != ref.masks).mean() < 1e-3


def test_results_are_well_formed_for_arrays_and_paths(model: GeoPixel, golden_dir: Path) -> None:
    path = golden_dir / "images" / "img_1000x600.png"
    forced = _forced_answer(model, 1)
    result = model._run([str(path)], [RRSIS_TEMPLATE.format("red car")], hd_num=1,
                        max_new_tokens=forced.shape[1], forced_token_ids=forced)[0]
    assert result.text == "Sure, it is [SEG] .\n"  # 4.33 decode: spaces around added tokens
    assert result.masks.shape == (1, 600, 1000) and result.masks.dtype == np.bool_
    assert result.scores.shape == (1,) and result.scores.dtype == np.float32
    assert result.seg_hidden.shape == (1, model.config.llm.hidden_size)
    assert result.phrases == [] and result.mask_logits is None
    kept = model._run([str(path)], [RRSIS_TEMPLATE.format("red car")], hd_num=1,
                      max_new_tokens=forced.shape[1], forced_token_ids=forced, keep_mask_logits=True)[0]
    assert kept.mask_logits is not None and kept.mask_logits.dtype == np.float16  # half the host copy
    assert kept.mask_logits.shape == (1, 600, 1000) and np.array_equal(kept.masks, kept.mask_logits > 0)
    for batch in (model.describe_batch([path], hd_num=1, max_new_tokens=3, keep_mask_logits=True),
                  model.segment_batch([path], "red car", hd_num=1, max_new_tokens=3, keep_mask_logits=True)):
        assert batch[0].mask_logits is not None and batch[0].mask_logits.dtype == np.float16
        assert batch[0].mask_logits.shape == batch[0].masks.shape
    assert model.segment_batch([path], "red car", hd_num=1, max_new_tokens=3)[0].mask_logits is None
    pieces: list[str] = []
    streamed = model.describe(load_image(path), hd_num=1, max_new_tokens=5, stream=pieces.append)
    assert "".join(pieces) == streamed.text and len(streamed.token_ids) == 5


def test_context_limit_downscales_large_images_and_refuses_impossible_prompts(model: GeoPixel) -> None:
    limit = model.config.llm.max_length
    big = np.zeros((3000, 4000, 3), np.uint8)  # the reference's 6x7 grid = 17341 image tokens > 16384
    grid = model._fit_grid(big, 9, reserved=1 + 40 + 1024)
    assert grid.downscaled and grid.num_tiles < 42
    assert (grid.num_tiles + 1) * 400 + 1 + (grid.rows + 1) * 20 + 1 + 40 + 1024 <= limit
    assert not model._fit_grid(np.zeros((800, 800, 3), np.uint8), 9, reserved=1065).downscaled
    with pytest.raises(ValueError, match="context"):
        model.describe(np.zeros((64, 64, 3), np.uint8), max_new_tokens=limit)
    with pytest.raises(ValueError, match="uint8"):
        model.describe(np.zeros((64, 64), np.uint8))


def test_compiled_decode_gives_the_eager_tokens_seg_hidden_and_masks(golden_dir: Path) -> None:
    model = GeoPixel.from_pretrained(golden_dir, device="cpu", dtype="fp32")  # own instance: state changes
    images = [load_image(golden_dir / "images" / "img_800x800.png")]
    queries = [RRSIS_TEMPLATE.format("red car")]
    forced = _forced_answer(model, 1)
    kw = {"hd_num": 1, "max_new_tokens": forced.shape[1], "forced_token_ids": forced}
    eager = model._run(images, queries, keep_mask_logits=True, **kw)[0]
    greedy = model.describe(images[0], hd_num=1, max_new_tokens=8).token_ids
    cache = model.llm.layers[0].attention.kv_cache
    assert cache is not None and model.llm.cache_len == 1024  # ~900 prompt + 8 new tokens, rounded; kept
    assert model.compile_decode(backend="aot_eager") is model
    compiled, calls = model._decode_fn, []
    assert compiled is not None
    model._decode_fn = lambda *a, **k: (calls.append(1), compiled(*a, **k))[1]  # type: ignore[assignment,func-returns-value]
    ours = model._run(images, queries, keep_mask_logits=True, **kw)[0]
    assert len(calls) == forced.shape[1] - 1  # every step after the prefill ran the compiled step
    assert model.llm.layers[0].attention.kv_cache is cache  # same batch and rounded length: same buffers
    assert ours.token_ids == eager.token_ids and ours.text == eager.text
    assert ours.seg_hidden.shape == (1, model.config.llm.hidden_size)
    assert np.array_equal(ours.seg_hidden, eager.seg_hidden)
    assert np.array_equal(ours.mask_logits, eager.mask_logits) and np.array_equal(ours.scores, eager.scores)
    assert model.describe(images[0], hd_num=1, max_new_tokens=8).token_ids == greedy
    model.free_caches()
    assert model.llm.layers[0].attention.kv_cache is None and model.llm.cache_len == 0


def test_prepare_then_run_prepared_is_the_one_code_path(
    model: GeoPixel, golden_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from geopixel import modeling
    from geopixel.host import PreparedBatch

    images = [load_image(golden_dir / "images" / n) for n in ("img_800x800.png", "img_1000x600.png")]
    queries = [model.segment_query(e) for e in ("red car", "trees")]
    forced = _forced_answer(model, 2)
    kw = {"hd_num": 1, "max_new_tokens": forced.shape[1]}
    parts = [model.prepare([im], q, **kw) for im, q in zip(images, queries, strict=True)]
    for part, image in zip(parts, images, strict=True):
        assert len(part) == 1 and part.sam_pixels is not None and part.max_new_tokens == forced.shape[1]
        assert part.crops[0].device.type == "cpu" and part.crops[0].dtype == model.dtype
        assert part.crops[0].shape == (1 + part.grids[0].num_tiles, 3, 560, 560)
        assert part.sam_pixels[0].shape == (3, 1024, 1024) and part.sam_pixels[0].dtype == model.dtype
        assert part.images[0] is image
    seen: list[tuple[int, torch.dtype]] = []

    def record(_module: torch.nn.Module, _args: tuple, kwargs: dict) -> None:
        seen.append((kwargs["pixel_values"].shape[0], kwargs["pixel_values"].dtype))

    monkeypatch.setattr(modeling, "CLIP_BATCH", 3)
    hook = model.vision.clip.register_forward_pre_hook(record, with_kwargs=True)
    try:
        ours = model.run_prepared(parts, forced_token_ids=forced, keep_mask_logits=True)
    finally:
        hook.remove()
    n_crops = sum(p.crops[0].shape[0] for p in parts)
    assert [k for k, _ in seen] == [3] * (n_crops // 3) + [n_crops % 3] * (n_crops % 3 > 0)
    assert {dtype for _, dtype in seen} == {model.dtype}
    ref = model._run(images, queries, forced_token_ids=forced, keep_mask_logits=True, **kw)
    for a, b in zip(ours, ref, strict=True):
        assert a.token_ids == b.token_ids and np.array_equal(a.masks, b.masks)
        assert np.array_equal(a.seg_hidden, b.seg_hidden) and np.array_equal(a.mask_logits, b.mask_logits)
    with pytest.raises(ValueError, match="max_new_tokens"):
        PreparedBatch.join([parts[0], model.prepare(images[:1], queries[0], hd_num=1, max_new_tokens=3)])
    with pytest.raises(ValueError, match="queries"):
        model.prepare(images, queries[:1], hd_num=1, max_new_tokens=3)


def _greedy_margins(model: GeoPixel, image: np.ndarray, query: str, tokens: list[int]) -> list[float]:
    """fp32 top-1 minus top-2 logit at each step of a greedy answer (full recomputation, no cache)."""
    with torch.inference_mode():
        prompt = model.build_prompts([image], [query], hd_num=1, max_new_tokens=len(tokens))[0]
        answer = model.llm.tok_embeddings(torch.tensor(tokens[:-1], dtype=torch.long))
        x = torch.cat([prompt.embeds, answer])[None]
        im = torch.cat([prompt.im_mask, torch.zeros(len(tokens) - 1, dtype=torch.bool)])[None]
        hidden = model.llm(x, im_mask=im)[0, prompt.embeds.shape[0] - 1 :]  # (n, C)
        top2 = model.llm.logits(hidden).topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).tolist()


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_half_precision_padded_batch_is_well_formed_and_follows_fp32(
    model: GeoPixel, golden_dir: Path, name: str
) -> None:
    half = GeoPixel.from_pretrained(golden_dir, device="cpu", dtype=name)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
    assert half.dtype == dtype
    images = [load_image(golden_dir / "images" / n) for n in ("img_800x800.png", "img_1000x600.png")]
    queries = [half.segment_query(e) for e in ("red car", "the white building on the left of the road")]
    forced = _forced_answer(half, 2)
    prepared = half.prepare(images, queries, hd_num=1, max_new_tokens=forced.shape[1])
    assert prepared.sam_pixels is not None
    assert {t.dtype for t in prepared.crops + prepared.sam_pixels} == {dtype}
    assert len({len(ids) for ids in prepared.text_ids}) == 2  # different lengths: a left-padded batch
    ours = half.run_prepared(prepared, forced_token_ids=forced, keep_mask_logits=True)
    ref = model._run(images, queries, hd_num=1, max_new_tokens=forced.shape[1], forced_token_ids=forced)
    for result, full, image in zip(ours, ref, images, strict=True):
        assert result.token_ids == full.token_ids and result.masks.shape == (1, *image.shape[:2])
        assert np.isfinite(result.seg_hidden).all() and result.mask_logits is not None
        assert np.isfinite(result.mask_logits.astype(np.float32)).all()
        assert ((result.scores > 0) & (result.scores <= 1)).all()
        cos = (result.seg_hidden * full.seg_hidden).sum() / (
            np.linalg.norm(result.seg_hidden) * np.linalg.norm(full.seg_hidden)
        )
        assert cos > 0.99, cos
        np.testing.assert_allclose(result.scores, full.scores, atol=2e-2)
        assert (result.masks == full.masks).mean() > 0.95
    # Greedy tokens equal fp32's up to the first step where fp32's own top-2 margin is a near-tie.
    greedy = half.segment_batch(images, ["red car", "trees"], hd_num=1, max_new_tokens=6)
    greedy32 = model.segment_batch(images, ["red car", "trees"], hd_num=1, max_new_tokens=6)
    for image, expr, ours16, ref32 in zip(images, ["red car", "trees"], greedy, greedy32, strict=True):
        margins = _greedy_margins(model, image, model.segment_query(expr), ref32.token_ids)
        safe = next((k for k, m in enumerate(margins) if m < 0.1), len(margins))
        print(f"{name} {expr!r}: fp32 margins {[round(m, 3) for m in margins]}, compared {safe} tokens")
        assert safe >= 1 and ours16.token_ids[:safe] == ref32.token_ids[:safe]
