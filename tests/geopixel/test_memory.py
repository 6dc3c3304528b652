"""Batch size from free memory, and the decode/prefill limits, with the real 7B sizes (pure arithmetic)."""

from __future__ import annotations

import pytest
import torch
from geopixel import GeoPixel, GeoPixelConfig
from geopixel.memory import (
    auto_batch_size,
    bytes_per_row,
    decode_weight_bytes,
    kv_bytes_per_token,
    limits,
    tile_prompt_tokens,
)

REAL = GeoPixelConfig.from_name("geopixel-7b")
BF16 = torch.bfloat16
GB = 1e9


def test_tile_prompt_of_an_800px_tile() -> None:
    assert tile_prompt_tokens(REAL, width=800, height=800, hd_num=9) == (4081 + 64, 10)
    assert tile_prompt_tokens(REAL, width=800, height=800, hd_num=4) == (
        2061 + 64,
        5,
    )  # (4 + 1) x 400 + 1 + 3 x 20


def test_per_row_budget_of_the_7b_model() -> None:
    parts = bytes_per_row(REAL, prompt_tokens=4145, max_new_tokens=1024, dtype=BF16)
    assert kv_bytes_per_token(REAL.llm, BF16) == 2 * 32 * 8 * 128 * 2
    assert parts["kv_cache"] == 5376 * 131072  # 4145 + 1024 rounded up to 21 x 256 slots
    assert parts["prefill"] == pytest.approx(0.926 * GB, rel=0.01)
    assert parts["clip"] == pytest.approx(0.614 * GB, rel=0.01)
    assert parts["sam2"] == pytest.approx(0.406 * GB, rel=0.01)
    fp32 = bytes_per_row(REAL, prompt_tokens=4145, max_new_tokens=1024, dtype=torch.float32)
    assert fp32["kv_cache"] == 2 * parts["kv_cache"] and fp32["prefill"] > 1.9 * parts["prefill"]


def test_auto_batch_size_on_an_80gb_card() -> None:
    kw = {"config": REAL, "prompt_tokens": 4145, "dtype": BF16}
    # 80 GB card, 17.8 GB of weights: (62e9 x 0.9 - 2 GiB) / 2.65 GB per row = 20.2
    chosen = auto_batch_size(free_bytes=int(62 * GB), max_new_tokens=1024, **kw)
    assert chosen == 20
    per_row = sum(bytes_per_row(REAL, prompt_tokens=4145, max_new_tokens=1024, dtype=BF16).values())
    assert 17.8 * GB + chosen * per_row <= 72 * GB  # the issue's <= 70 GB target, with the upper bound
    assert auto_batch_size(free_bytes=int(62 * GB), max_new_tokens=300, **kw) == 21  # shorter answers
    assert auto_batch_size(free_bytes=int(121 * GB), max_new_tokens=1024, **kw) == 32  # H200: capped
    assert auto_batch_size(free_bytes=int(121 * GB), max_new_tokens=1024, cap=8, **kw) == 8
    assert auto_batch_size(free_bytes=int(6 * GB), max_new_tokens=1024, **kw) == 1  # 24 GB card
    assert auto_batch_size(free_bytes=0, max_new_tokens=1024, **kw) == 1  # never below one
    sizes = [auto_batch_size(free_bytes=int(g * GB), max_new_tokens=1024, **kw) for g in range(4, 120, 4)]
    assert sizes == sorted(sizes)


def test_decode_reads_the_llm_weights_without_adapters_embedding_clip_or_sam() -> None:
    with torch.device("meta"):
        model = GeoPixel(REAL)
    llm = model.llm
    counted = sum(
        p.numel()
        for n, p in llm.named_parameters()
        if "Plora" not in n and not n.startswith("tok_embeddings")
    )
    assert decode_weight_bytes(REAL.llm, BF16) == 2 * counted == 14_717_370_368
    h100 = limits(
        REAL.llm,
        bandwidth=3.35e12,
        flops=989.4e12,
        context=4121 + 150,
        batches=(1, 16),
        prompt_tokens=4121,
        image_tokens=4081,
        dtype=BF16,
    )
    assert h100["decode_ms_b1"] == pytest.approx(4.56, abs=0.01)  # the figures
    assert h100["decode_tok_s_b1"] == pytest.approx(219, abs=1)
    assert h100["decode_ms_b16"] == pytest.approx(7.07, abs=0.01)
    assert h100["prefill_ms"] == pytest.approx(67.6, abs=0.1)
