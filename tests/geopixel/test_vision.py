"""VisionTower: checkpoint names, layout, and parity with the reference's image embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from geopixel.config import GeoPixelConfig
from geopixel.hd_divider import apply_grid, crops_for_clip, image_token_count, normalize_clip, plan_grid
from geopixel.vision import VisionTower
from PIL import Image
from safetensors.torch import load_file

VISION_PREFIXES = ("vit.", "vision_proj.", "plora_")
CASES = [f"img_{size}_hd{n}" for size in ("800x800", "1000x600", "600x1400") for n in (1, 4, 9)]
TOL = {"atol": 1e-4, "rtol": 1e-4}  # golden README §6 for float32 vision tensors


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def golden_vision_state(golden_dir: Path) -> dict[str, torch.Tensor]:
    weights = load_file(str(golden_dir / "model.safetensors"))
    return {k: v for k, v in weights.items() if k.startswith(VISION_PREFIXES)}


@pytest.fixture(scope="module")
def tower(golden_dir: Path, golden_vision_state: dict[str, torch.Tensor]) -> VisionTower:
    model = VisionTower.from_config(GeoPixelConfig.from_dir(golden_dir)).eval()
    model.load_state_dict(golden_vision_state, strict=True)
    return model


@pytest.fixture(scope="module")
def hd_cases(golden_dir: Path) -> dict:
    return json.loads((golden_dir / "hd_cases.json").read_text())


def _report(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, name
    print(f"{name}: max abs err {(ours.float() - ref).abs().max().item():.3e}")
    torch.testing.assert_close(ours.float(), ref, **TOL)


def test_state_dict_names_match_the_release(golden_vision_state: dict[str, torch.Tensor]) -> None:
    model = VisionTower.from_config(GeoPixelConfig.from_name("tiny"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in golden_vision_state.items()}
    assert not any("position_ids" in k for k in ours)  # non-persistent buffer, not in checkpoints
    assert ours["plora_glb_GN"] == (1, 1, 96) and ours["plora_sub_GN"] == (1, 1, 1, 96)


@pytest.mark.parametrize("case", CASES)
def test_image_embeds_match_reference(
    case: str, tower: VisionTower, golden_dir: Path, hd_cases: dict
) -> None:
    c = hd_cases[case]
    expected = load_file(str(golden_dir / "image_embeds.safetensors"))[case]
    with torch.no_grad():
        (ours,) = tower.encode_images([_rgb(golden_dir / c["source_png"])], c["hd_num"], batch_size=4)
    assert ours.shape == (c["emb_len"], 32)
    _report(case, ours, expected)


def test_debug_intermediates_match_reference(tower: VisionTower, golden_dir: Path) -> None:
    debug = load_file(str(golden_dir / "vision_debug.safetensors"))
    image = _rgb(golden_dir / "images" / "img_1000x600.png")
    grid = plan_grid(1000, 600, 4, rule="inference")
    crops = crops_for_clip(normalize_clip(apply_grid(image, grid)), grid)
    with torch.no_grad():
        feats = tower.patch_features(crops)
        (seq,) = tower.arrange(feats, [(grid.rows, grid.cols)])
    _report("clip_patch_features", feats, debug["clip_patch_features"])
    _report("vit_sequence_pre_projector", seq, debug["vit_sequence_pre_projector"])


def test_several_images_in_one_call_equal_single_calls(tower: VisionTower, golden_dir: Path) -> None:
    images = [_rgb(golden_dir / "images" / n) for n in ("img_600x1400.png", "img_1000x600.png")]
    with torch.no_grad():
        batched = tower.encode_images(images, 1, batch_size=3)
        singles = [tower.encode_images([im], 1)[0] for im in images]
    assert [b.shape[0] for b in batched] == [1261, 841]
    for b, s in zip(batched, singles, strict=True):
        torch.testing.assert_close(b, s, atol=1e-5, rtol=1e-5)


def test_merge_and_layout_order() -> None:
    """Synthetic features that encode (crop, y, x, k): checks the (dy, dx, C) merge and the GN layout."""
    model = VisionTower.from_config(GeoPixelConfig.from_name("tiny"))
    with torch.no_grad():
        model.plora_sub_GN.fill_(-1.0)
        model.plora_glb_GN.fill_(-2.0)
    rows, cols, side, c = 2, 3, 40, 24
    n = 1 + rows * cols
    crop, y, x, k = torch.meshgrid(
        torch.arange(n), torch.arange(side), torch.arange(side), torch.arange(c), indexing="ij"
    )
    feats = (crop * 1e6 + y * 1e4 + x * 1e2 + k).double().reshape(n, side * side, c)  # (N, P, C)
    with torch.no_grad():
        (seq,) = model.arrange(feats, [(rows, cols)])
    assert seq.shape == (image_token_count(rows, cols), 96)

    def token(crop_i: int, r: int, col: int) -> torch.Tensor:
        parts = [
            crop_i * 1e6 + (2 * r + dy) * 1e4 + (2 * col + dx) * 1e2 + torch.arange(c)
            for dy in (0, 1)
            for dx in (0, 1)
        ]
        return torch.cat(parts).double()

    torch.testing.assert_close(seq[0], token(0, 0, 0))
    torch.testing.assert_close(seq[21 * 5 + 7], token(0, 5, 7))  # global row 5, column 7
    assert (seq[20] == -1).all() and (seq[21 * 19 + 20] == -1).all()  # global rows end with sub_GN
    assert (seq[420] == -2).all()  # one glb_GN after the global block
    start, width = 421, 20 * cols + 1
    # Canvas row 27 = tile row 1, in-tile row 7; canvas column 45 = tile column 2, in-tile column 5.
    torch.testing.assert_close(seq[start + 27 * width + 45], token(1 + 1 * cols + 2, 7, 5))
    assert (seq[start + 27 * width + 60] == -1).all()
    assert (seq[start + torch.arange(rows * 20) * width + 60] == -1).all()


def test_random_tiny_tower_runs_in_bfloat16() -> None:
    torch.manual_seed(0)
    model = VisionTower.from_config(GeoPixelConfig.from_name("tiny")).to(torch.bfloat16).eval()
    image = np.random.default_rng(0).integers(0, 256, size=(300, 500, 3), dtype=np.uint8)
    with torch.no_grad():
        (out,) = model.encode_images([image], 1)
    assert out.dtype == torch.bfloat16 and out.shape == (841, 32)
    assert torch.isfinite(out.float()).all()


def test_rejects_mismatched_crop_count() -> None:
    model = VisionTower.from_config(GeoPixelConfig.from_name("tiny"))
    with pytest.raises(ValueError, match="crops"):
        model.arrange(torch.zeros(3, 1600, 24), [(1, 1)])
