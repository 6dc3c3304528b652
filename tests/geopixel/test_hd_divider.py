"""HD divider: exact parity with the reference transforms (golden PNGs + hd_cases.json) and grids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from geopixel.hd_divider import (
    CLIP_MEAN,
    CLIP_STD,
    Grid,
    apply_grid,
    crops_for_clip,
    hd_transform,
    image_token_count,
    normalize_clip,
    plan_grid,
)
from PIL import Image

CASES = [f"img_{size}_hd{n}" for size in ("800x800", "1000x600", "600x1400") for n in (1, 4, 9)]


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def hd_cases(golden_dir: Path) -> dict:
    return json.loads((golden_dir / "hd_cases.json").read_text())


@pytest.mark.parametrize("case", CASES)
def test_hd_transform_matches_reference(case: str, golden_dir: Path, hd_cases: dict) -> None:
    c = hd_cases[case]
    image = _rgb(golden_dir / c["source_png"])
    assert [image.shape[1], image.shape[0]] == c["orig_wh"]

    grid = plan_grid(image.shape[1], image.shape[0], c["hd_num"], rule="inference")
    assert [grid.rows, grid.cols] == c["grid_hw"]
    assert grid.num_tiles == c["num_sub_crops"]
    assert [grid.canvas_width, grid.canvas_height] == c["hd_wh"]
    assert image_token_count(grid.rows, grid.cols) == c["emb_len"]

    canvas = hd_transform(image, c["hd_num"])
    expected = _rgb(golden_dir / c["hd_png"])
    assert canvas.dtype == np.uint8 and canvas.shape == expected.shape
    assert np.array_equal(canvas, expected), f"{case}: {(canvas != expected).sum()} pixel values differ"

    norm = normalize_clip(canvas)
    assert norm.dtype == torch.float32 and norm.shape == (3, *canvas.shape[:2])
    n64 = norm.double()
    np.testing.assert_allclose(
        n64.mean(dim=(1, 2)).numpy(), c["norm_mean_per_channel"], rtol=1e-9, atol=1e-12
    )
    np.testing.assert_allclose(
        n64.std(dim=(1, 2)).numpy(), c["norm_std_per_channel"], rtol=1e-9
    )  # unbiased std
    np.testing.assert_allclose(n64.sum().item(), c["norm_sum"], rtol=1e-9)
    assert norm[:, :4, :4].tolist() == c["norm_crop_rows0_4_cols0_4"]
    assert norm[:, -4:, -4:].tolist() == c["norm_crop_last_rows_cols"]


# ARCHITECTURE.md §3 "Measured grids": (W, H) -> inference hd 9 (rows, cols), training hd 9, training hd 1.
MEASURED = [
    ((800, 800), (3, 3), (3, 3), (1, 1)),
    ((1024, 768), (3, 3), (3, 3), (1, 1)),
    ((600, 400), (2, 3), (2, 2), (1, 1)),
    ((300, 300), (3, 3), (1, 1), (1, 1)),
    ((2000, 500), (1, 4), (1, 4), (1, 1)),
    ((3840, 2160), (4, 6), (2, 3), (1, 1)),
    ((4000, 3000), (6, 7), (3, 3), (1, 1)),
    ((10000, 10000), (17, 17), (3, 3), (1, 1)),
]


@pytest.mark.parametrize(("size", "inf9", "train9", "train1"), MEASURED)
def test_measured_grids(size: tuple[int, int], inf9: tuple, train9: tuple, train1: tuple) -> None:
    w, h = size
    for hd_num, rule, want in ((9, "inference", inf9), (9, "training", train9), (1, "training", train1)):
        g = plan_grid(w, h, hd_num, rule=rule)
        assert (g.rows, g.cols) == want, (size, hd_num, rule)
        assert not g.downscaled
        # The content fills the canvas along the long side and is padded along the other.
        assert g.pad_top + g.height + g.pad_bottom == g.canvas_height
        assert g.pad_left + g.width + g.pad_right == g.canvas_width


def test_measured_canvas_sizes() -> None:
    assert (plan_grid(600, 400, 9, rule="inference").canvas_width, 1120) == (1680, 1120)
    g = plan_grid(3840, 2160, 9, rule="inference")
    assert (g.canvas_width, g.canvas_height) == (3360, 2240)
    g = plan_grid(4000, 3000, 9, rule="inference")
    assert (g.canvas_width, g.canvas_height) == (3920, 3360)


def test_truncation_and_padding_side_inference() -> None:
    # 560 / (1000/600) is exactly 336.0 in float64: the golden canvas has 336 content rows (the
    # "335" of the README/ARCHITECTURE example is not what the reference produced).
    g = plan_grid(1000, 600, 1, rule="inference")
    assert (g.width, g.height, g.pad_top, g.pad_bottom) == (560, 336, 0, 224)
    g = plan_grid(1000, 601, 1, rule="inference")  # 336.56 truncates to 336 (rounding would give 337)
    assert g.height == 336
    portrait = plan_grid(600, 1400, 4, rule="inference")  # transposed: padding on the right
    assert portrait.transposed and (portrait.rows, portrait.cols) == (2, 1)
    # 1120 / (1400/600) = 479.99999...: truncated to 479 (bit-exact with the golden hd PNG).
    assert (portrait.width, portrait.height, portrait.pad_left, portrait.pad_right) == (479, 1120, 0, 81)


def test_training_rule_centres_the_padding() -> None:
    image = np.random.default_rng(0).integers(0, 256, size=(601, 1000, 3), dtype=np.uint8)
    g = plan_grid(1000, 601, 4, rule="training")  # s = min(ceil(1500/560)=3, budget 2) = 2
    assert (g.rows, g.cols, g.width, g.height) == (2, 2, 1120, 673)
    assert (g.pad_top, g.pad_bottom) == (223, 224)  # floor((1120 - 673) / 2) on top, the rest below
    canvas = hd_transform(image, 4, rule="training")
    resized = np.asarray(Image.fromarray(image).resize((1120, 673), Image.Resampling.BILINEAR))
    assert np.array_equal(canvas[223 : 223 + 673], resized)
    assert (canvas[:223] == 255).all() and (canvas[223 + 673 :] == 255).all()

    portrait = plan_grid(601, 1000, 4, rule="training")
    assert portrait.transposed and (portrait.pad_left, portrait.pad_right) == (223, 224)
    canvas_t = hd_transform(np.ascontiguousarray(image.transpose(1, 0, 2)), 4, rule="training")
    assert np.array_equal(canvas_t, canvas.transpose(1, 0, 2))


def test_image_token_count() -> None:
    assert image_token_count(3, 3) == 4081
    assert image_token_count(1, 1) == 841
    assert image_token_count(4, 6) == 10101
    assert image_token_count(6, 7) == 17341
    assert image_token_count(2, 2, merged_grid=1) == 5 + 1 + 3  # generalises to any merged grid


def test_max_tiles_downscales_large_images() -> None:
    full = plan_grid(4000, 3000, 9, rule="inference")
    assert full.num_tiles == 42 and not full.downscaled
    capped = plan_grid(4000, 3000, 9, rule="inference", max_tiles=9)
    assert capped.downscaled and capped.num_tiles <= 9
    assert (capped.rows, capped.cols) == (3, 3)  # the hd 9 budget grid for a 4:3 image
    capped_12 = plan_grid(4000, 3000, 9, rule="inference", max_tiles=12)
    assert capped_12.downscaled and capped_12.num_tiles <= 12 and capped_12.cols == 4
    # A grid within the cap is the rule's own, unflagged.
    assert plan_grid(4000, 3000, 9, rule="inference", max_tiles=42) == full
    with pytest.raises(ValueError, match="max_tiles"):
        plan_grid(4000, 3000, 9, rule="inference", max_tiles=9, downscale=False)
    # A cap below the budget also applies to small (upscaled) images.
    small = plan_grid(300, 300, 9, rule="inference", max_tiles=4)
    assert small.downscaled and (small.rows, small.cols) == (2, 2)


def test_max_tiles_canvas_is_the_capped_grid() -> None:
    image = np.random.default_rng(1).integers(0, 256, size=(700, 2300, 3), dtype=np.uint8)
    assert plan_grid(2300, 700, 4, rule="inference").num_tiles == 4 * 2
    canvas = hd_transform(image, 4, max_tiles=4)
    g = plan_grid(2300, 700, 4, rule="inference", max_tiles=4)
    assert g.downscaled and g.num_tiles <= 4
    assert canvas.shape == (g.canvas_height, g.canvas_width, 3)


def test_crops_for_clip_order_and_global_view() -> None:
    image = np.random.default_rng(2).integers(0, 256, size=(600, 1000, 3), dtype=np.uint8)
    grid = plan_grid(1000, 600, 9, rule="inference")
    norm = normalize_clip(apply_grid(image, grid))
    crops = crops_for_clip(norm, grid)
    assert crops.shape == (1 + 6, 3, 560, 560) and crops.dtype == torch.float32
    for i in range(grid.rows):
        for j in range(grid.cols):
            tile = norm[:, 560 * i : 560 * (i + 1), 560 * j : 560 * (j + 1)]
            assert torch.equal(crops[1 + i * grid.cols + j], tile)
    glb = F.interpolate(norm[None], size=(560, 560), mode="bicubic", align_corners=False)[0]
    assert torch.equal(crops[0], glb)
    # White padding normalises to (1 - mean) / std.
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(norm[:, -1, -1], white)
    with pytest.raises(ValueError, match="does not match"):
        crops_for_clip(norm, Grid(1, 1, 560, 560, 0, 0, 0, 0, transposed=False))


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="uint8"):
        hd_transform(np.zeros((10, 10), dtype=np.uint8), 1)
    with pytest.raises(ValueError, match="uint8"):
        normalize_clip(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="rule"):
        plan_grid(10, 10, 1, rule="eval")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 1"):
        plan_grid(10, 10, 0, rule="inference")
