"""Pixel grounding: released-name map, SAM-2 parity with the reference goldens, train-mode behaviour.

Goldens: ``../shared/golden/reference-tiny`` (README §4 (d), (d'), tolerances §6). The SAM-2 image
embedding is rounded to bf16 before the decoder, so end-to-end decoder outputs get the README's
looser tolerance; the decoder in isolation (fed the stored fp32 features) gets the strict one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from geopixel.config import GeoPixelConfig
from geopixel.grounding import Grounding, ImageFeatures, select_mask_tokens, stability_scores
from geopixel.sam2_names import (
    RELEASED_SAM2_PREFIX,
    SAM2_UNUSED_PREFIXES,
    convert_grounding_state_dict,
    convert_sam2_state_dict,
    expected_released_sam2_keys,
    is_unused_sam2_key,
    map_sam2_name,
)
from PIL import Image
from safetensors.torch import load_file
from transformers.models.sam2.modeling_sam2 import Sam2MultiScaleAttention

TSV = Path(__file__).resolve().parents[2] / ".." / "shared" / "reference" / "geopixel_7b_state_dict_keys.tsv"
TF_CASES = ["rrsis_img_800x800_hd9", "gcg_img_800x800_hd9", "rrsis_img_1000x600_hd4", "gcg_img_1000x600_hd4"]
IMAGES = ["img_800x800", "img_1000x600"]
GROUNDING_FAMILIES = (RELEASED_SAM2_PREFIX, "model.text_hidden_fcs.")


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _close(name: str, got: torch.Tensor, want: torch.Tensor, *, atol: float, rtol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    ok = torch.allclose(got.double(), want.double(), atol=atol, rtol=rtol)
    assert ok, f"{name}: max abs error {_max_err(got, want):.3g} (atol {atol}, rtol {rtol})"


def _read_tsv() -> dict[str, tuple[int, ...]]:
    if not TSV.is_file():
        pytest.fail(
            f"real key listing not found at {TSV} (check out ../shared beside the repo)", pytrace=False
        )
    rows = [
        line.rstrip("\n").split("\t") for line in TSV.read_text().splitlines() if not line.startswith("#")
    ]
    return {key: tuple(int(x) for x in shape.split("x")) for key, shape in rows}


# ---------------------------------------------------------------- name map


def test_expected_keys_equal_real_7b_listing() -> None:
    listing = _read_tsv()
    real = {
        k[len(RELEASED_SAM2_PREFIX) :]: s for k, s in listing.items() if k.startswith(RELEASED_SAM2_PREFIX)
    }
    expected = expected_released_sam2_keys(GeoPixelConfig.from_name("geopixel-7b").grounding)
    assert len(real) == 900
    assert set(expected) == set(real)
    assert {k: s for k, s in expected.items() if real[k] != s} == {}


def test_7b_listing_maps_onto_meta_module_exactly() -> None:
    """Every model.visual_model.* key is mapped (right shape) or listed unused; every parameter covered."""
    cfg = GeoPixelConfig.from_name("geopixel-7b")
    with torch.device("meta"):
        module = Grounding(cfg.grounding, hidden_size=cfg.llm.hidden_size)
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    listing = _read_tsv()
    released = {
        k: torch.empty(s, device="meta", dtype=torch.bfloat16)
        for k, s in listing.items()
        if k.startswith(GROUNDING_FAMILIES)
    }
    converted = convert_grounding_state_dict(released)
    assert set(converted) == set(ours)
    assert {k: tuple(v.shape) for k, v in converted.items() if tuple(v.shape) != ours[k]} == {}
    unused = [k for k in released if k.startswith(RELEASED_SAM2_PREFIX) and is_unused_sam2_key(k)]
    assert len(unused) + len(converted) == len(released)
    # every unused family really occurs (the list is not stale) and none of them is ever mapped
    for prefix in SAM2_UNUSED_PREFIXES:
        assert any(k[len(RELEASED_SAM2_PREFIX) :].startswith(prefix) for k in unused), prefix


def test_tiny_checkpoint_keys_equal_expected(tiny_released: dict[str, torch.Tensor]) -> None:
    got = {
        k[len(RELEASED_SAM2_PREFIX) :]: tuple(v.shape)
        for k, v in tiny_released.items()
        if k.startswith(RELEASED_SAM2_PREFIX)
    }
    assert got == expected_released_sam2_keys(GeoPixelConfig.from_name("tiny").grounding)


def test_map_is_strict() -> None:
    assert (
        map_sam2_name("model.visual_model.sam_mask_decoder.conv_s0.weight") == "mask_decoder.conv_s0.weight"
    )
    assert map_sam2_name("image_encoder.trunk.blocks.3.mlp.layers.1.bias") == (
        "image_encoder.backbone.blocks.3.mlp.proj_out.bias"
    )
    assert map_sam2_name("sam_mask_decoder.iou_prediction_head.layers.1.weight") == (
        "mask_decoder.iou_prediction_head.layers.0.weight"
    )
    assert map_sam2_name("model.visual_model.memory_encoder.fuser.layers.0.weight") is None
    for bad in ("model.visual_model.sam_mask_decoder.new_head.weight", "image_encoder.trunk.blocks.0.gamma"):
        with pytest.raises(KeyError):
            map_sam2_name(bad)
    with pytest.raises(KeyError):
        convert_grounding_state_dict({"output.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="two released keys"):
        convert_sam2_state_dict(
            {"no_mem_embed": torch.zeros(1), "model.visual_model.no_mem_embed": torch.zeros(1)}
        )


def test_load_released_is_strict(tiny_released: dict[str, torch.Tensor]) -> None:
    cfg = GeoPixelConfig.from_name("tiny")
    module = Grounding(cfg.grounding, hidden_size=cfg.llm.hidden_size)
    partial = dict(tiny_released)
    del partial["model.visual_model.sam_mask_decoder.conv_s1.bias"]
    with pytest.raises(RuntimeError, match="conv_s1.bias"):
        module.load_released(partial)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_released(golden_dir: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(golden_dir / "model.safetensors"))
    return {k: v for k, v in state.items() if k.startswith(GROUNDING_FAMILIES)}


@pytest.fixture(scope="module")
def grounding(tiny_released: dict[str, torch.Tensor]) -> Grounding:
    cfg = GeoPixelConfig.from_name("tiny")
    module = Grounding(cfg.grounding, hidden_size=cfg.llm.hidden_size)
    module.load_released(tiny_released)
    return module.eval()


@pytest.fixture(scope="module")
def unit(golden_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(golden_dir / "sam_decoder_unit.safetensors"))


@pytest.fixture(scope="module")
def encoded(grounding: Grounding, golden_dir: Path) -> tuple[torch.Tensor, ImageFeatures]:
    """Both tf images encoded in one batch: (pixels (2,3,1024,1024), features)."""
    images = [np.array(Image.open(golden_dir / "images" / f"{n}.png").convert("RGB")) for n in IMAGES]
    pixels = grounding.preprocess(images)
    return pixels, grounding.encode_images(pixels)


def _unit_features(unit: dict[str, torch.Tensor], case: str) -> ImageFeatures:
    offset = 4.0 if case == "stable" else 0.0  # README (d'): the stable case shifts high_res_feat0 by 4
    return ImageFeatures(
        unit["image_embed"][None], (unit["high_res_feat0"][None] + offset, unit["high_res_feat1"][None])
    )


# ---------------------------------------------------------------- decoder in isolation (strict)


def test_dense_pe(grounding: Grounding, unit: dict[str, torch.Tensor]) -> None:
    _close("dense_pe", grounding.dense_pe()[0], unit["dense_pe"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["unstable", "stable"])
def test_decoder_unit_all_tokens(grounding: Grounding, unit: dict[str, torch.Tensor], case: str) -> None:
    with torch.no_grad():
        out = grounding.predict_masks(_unit_features(unit, case), unit[f"{case}.prompt"][:, 0])
    _close(f"{case}.all_mask_logits", out.low_res, unit[f"{case}.all_mask_logits"], atol=1e-3, rtol=1e-3)
    _close(f"{case}.all_iou", out.iou, unit[f"{case}.all_iou"], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case", ["unstable", "stable"])
def test_decoder_unit_selection(
    grounding: Grounding, unit: dict[str, torch.Tensor], case: str, mode: str
) -> None:
    grounding.train(mode == "train")
    try:
        with torch.no_grad():
            out = grounding.decode_masks(
                _unit_features(unit, case), unit[f"{case}.prompt"][:, 0], orig_hw=(800, 800)
            )
    finally:
        grounding.eval()
    _close(f"{case}.{mode}.low_res", out.low_res, unit[f"{case}.{mode}.low_res_masks"], atol=1e-3, rtol=1e-3)
    _close(f"{case}.{mode}.iou", out.iou, unit[f"{case}.{mode}.iou"][0], atol=1e-3, rtol=1e-3)
    assert out.mask_logits.dtype == torch.float32 and out.mask_logits.shape == (1, 800, 800)


def test_matches_transformers_decoder_forward(grounding: Grounding, unit: dict[str, torch.Tensor]) -> None:
    """Our decoder glue equals transformers' own Sam2MaskDecoder.forward (eval fallback and train)."""
    feats = _unit_features(unit, "unstable")
    prompt = unit["unstable.prompt"]  # (1, 1, C)
    dec = grounding.mask_decoder
    embed = feats.image_embed.to(torch.bfloat16).float()
    dense = grounding.no_mask_embed.weight.view(1, -1, 1, 1).expand_as(embed)
    for training in (False, True):
        grounding.train(training)
        try:
            with torch.no_grad():
                ref_masks, ref_iou, _, _ = dec(
                    image_embeddings=embed,
                    image_positional_embeddings=grounding.dense_pe(),
                    sparse_prompt_embeddings=prompt[None],
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                    high_resolution_features=list(feats.high_res),
                )
                ours = grounding.decode_masks(feats, prompt[:, 0], orig_hw=(256, 256))
        finally:
            grounding.eval()
        _close(f"hf low_res training={training}", ours.low_res, ref_masks[0], atol=1e-5, rtol=1e-5)
        _close(f"hf iou training={training}", ours.iou, ref_iou[0, :, 0], atol=1e-6, rtol=1e-6)


def test_no_prompts_gives_empty_masks(grounding: Grounding, unit: dict[str, torch.Tensor]) -> None:
    out = grounding.decode_masks(_unit_features(unit, "stable"), torch.zeros(0, 16), orig_hw=(30, 40))
    assert (
        out.mask_logits.shape == (0, 30, 40)
        and out.low_res.shape == (0, 1, 256, 256)
        and out.iou.shape == (0,)
    )


def test_stability_selection_rules() -> None:
    low = torch.full((3, 4, 8, 8), -1.0)
    low[0, 0] = 1.0  # stable token 0 (stability 1)
    low[1, 0, :4] = 1.0
    low[1, 0, 4:] = 0.0  # 32 of 64 within ±delta: stability 0.5
    # row 2: token 0 all below -delta: denominator 0 → stability 1.0 → token 0
    iou = torch.tensor([[0.1, 0.9, 0.2, 0.3], [0.9, 0.1, 0.2, 0.8], [0.1, 0.2, 0.9, 0.3]])
    assert stability_scores(low[:, 0], delta=0.05).tolist() == [1.0, 0.5, 1.0]
    assert select_mask_tokens(low, iou, dynamic=True, delta=0.05, thresh=0.98).tolist() == [0, 3, 0]
    assert select_mask_tokens(low, iou, dynamic=False, delta=0.05, thresh=0.98).tolist() == [0, 0, 0]


# ---------------------------------------------------------------- end to end (tf goldens)


def test_preprocess_rejects_non_rgb_uint8(grounding: Grounding) -> None:
    with pytest.raises(ValueError):
        grounding.preprocess([np.zeros((8, 8), np.uint8)])
    with pytest.raises(ValueError):
        grounding.preprocess([np.zeros((8, 8, 3), np.uint16)])


def test_sdpa_hiera_attention_equals_library(grounding: Grounding) -> None:
    block = next(b for b in grounding.image_encoder.backbone.blocks if b.query_stride)
    x = torch.randn(2, 8, 8, block.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = block.attn(x)
        ref = Sam2MultiScaleAttention.forward(block.attn, x)
    _close("hiera attention", ours, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", TF_CASES)
def test_tf_golden(
    grounding: Grounding, encoded: tuple[torch.Tensor, ImageFeatures], golden_dir: Path, case: str
) -> None:
    gold = load_file(str(golden_dir / f"tf_{case}.safetensors"))
    meta = json.loads((golden_dir / f"tf_{case}.json").read_text())
    index = IMAGES.index(Path(meta["image"]).stem)
    pixels, feats = encoded
    n_seg, height, width = meta["pred_masks_shape"]

    _close("sam_input_crop", pixels[index, :, 500:516, 380:396], gold["sam_input_crop"], atol=1e-6, rtol=0)
    _close(
        "sam_input_mean",
        pixels[index].double().mean((1, 2)),
        torch.tensor(meta["sam_input_mean_per_channel"]),
        atol=1e-6,
        rtol=0,
    )
    _close(
        "image_embed_sum",
        feats.image_embed[index].double().sum((1, 2)),
        gold["sam_image_embed_sum_per_channel"],
        atol=1e-2,
        rtol=1e-5,
    )
    with torch.no_grad():
        prompts = grounding.project_seg(gold["seg_hidden"])
        _close("seg_embeddings", prompts, gold["seg_embeddings"], atol=1e-4, rtol=1e-4)
        prompts = gold["seg_embeddings"]  # isolate the SAM part from the projection
        every = grounding.predict_masks(feats, prompts, index=index)
        out = grounding.decode_masks(feats, prompts, orig_hw=(height, width), index=index)

    _close("decoder_all_iou", every.iou, gold["decoder_all_iou"], atol=1e-3, rtol=1e-3)
    _close("decoder_obj_score", every.object_score, gold["decoder_obj_score_logits"], atol=1e-3, rtol=1e-3)
    if "decoder_all_mask_logits_lowres" in gold:  # float16-stored
        _close(
            "decoder_all_mask_logits",
            every.low_res,
            gold["decoder_all_mask_logits_lowres"],
            atol=4e-3,
            rtol=2e-3,
        )
    decision = meta["dynamic_multimask"]
    _close("selected_iou", out.iou, torch.tensor(decision["selected_iou"])[:, 0], atol=1e-3, rtol=1e-3)
    assert out.iou.shape == (n_seg,)
    _close("low_res_masks", out.low_res, gold["low_res_masks"], atol=5e-2, rtol=0)
    assert out.mask_logits.shape == (n_seg, height, width)
    if "pred_masks" in gold:
        _close("pred_masks", out.mask_logits, gold["pred_masks"], atol=5e-2, rtol=0)
    else:
        rows = out.mask_logits[:, [0, 100, 250, height - 1]]
        _close("pred_masks_rows", rows, gold["pred_masks_rows_0_100_250_end"], atol=5e-2, rtol=0)
    fractions = (out.mask_logits > 0).double().mean((1, 2))
    _close(
        "positive_fraction", fractions, torch.tensor(meta["pred_masks_positive_fraction"]), atol=1e-3, rtol=0
    )
    # the discrete dynamic-multimask decision is reproduced exactly
    chosen = select_mask_tokens(every.low_res, every.iou, dynamic=True, delta=0.05, thresh=0.98)
    expected_token0 = torch.tensor(decision["used_token0"])
    assert torch.equal(chosen == 0, expected_token0)
    expected_best = torch.tensor(decision["all_iou"])[:, 1:].argmax(-1) + 1
    assert torch.equal(chosen[~expected_token0], expected_best[~expected_token0])


# ---------------------------------------------------------------- training behaviour


def test_train_mode_gradients(grounding: Grounding, encoded: tuple[torch.Tensor, ImageFeatures]) -> None:
    """Train mode: token 0, gradients reach the decoder and text_hidden_fcs, not the image encoder."""
    feats = encoded[1]
    # encode_images runs without autograd (frozen encoder, gradient-less conv_s0/conv_s1 as in the reference)
    assert not feats.image_embed.requires_grad and not any(f.requires_grad for f in feats.high_res)
    hidden = torch.randn(
        2, grounding.text_hidden_fcs[0][0].in_features, generator=torch.Generator().manual_seed(1)
    )
    grounding.train()
    grounding.zero_grad()
    try:
        out = grounding.decode_masks(feats, grounding.project_seg(hidden), orig_hw=(40, 60))
        every = grounding.predict_masks(feats, grounding.project_seg(hidden))
        out.mask_logits.sigmoid().mean().backward()
    finally:
        grounding.eval()
    assert out.mask_logits.shape == (2, 40, 60) and out.low_res.shape == (2, 1, 256, 256)
    assert torch.equal(out.low_res[:, 0], every.low_res[:, 0].detach())
    assert grounding.text_hidden_fcs[0][0].weight.grad is not None
    assert grounding.text_hidden_fcs[0][0].weight.grad.abs().sum() > 0
    assert grounding.mask_decoder.output_hypernetworks_mlps[0].proj_in.weight.grad is not None
    assert grounding.mask_decoder.conv_s0.weight.grad is None
    grounding.zero_grad()


def test_train_sample_golden(grounding: Grounding, golden_dir: Path) -> None:
    """README (e): the training forward's SAM-2 masks (train mode: token 0, no dynamic selection)."""
    gold = load_file(str(golden_dir / "train_sample.safetensors"))
    meta = json.loads((golden_dir / "train_sample.json").read_text())
    image = np.array(Image.open(golden_dir / "sample" / "P0224_0_800_0_800.png").convert("RGB"))
    pixels = grounding.preprocess([image])
    _close(
        "image_g_mean",
        pixels[0].double().mean((1, 2)),
        torch.tensor(meta["image_g_mean_per_channel"], dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )
    feats = grounding.encode_images(pixels)
    grounding.train()
    try:
        with torch.no_grad():
            out = grounding.decode_masks(feats, gold["seg_embeddings"], orig_hw=tuple(meta["ori_hw"]))
    finally:
        grounding.eval()
    _close("train low_res_masks", out.low_res, gold["low_res_masks"], atol=5e-2, rtol=0)
    assert out.mask_logits.shape == (meta["n_gt_masks"], *meta["ori_hw"])
