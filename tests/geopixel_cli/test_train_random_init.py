"""Random-weight checkpoints of other sizes (benchmarks/bench_training.py starts from one)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from geopixel_cli.train.random_init import SIZES, write_random_checkpoint

GOLDEN = (Path(__file__).resolve().parents[2] / ".." / "shared" / "golden" / "reference-tiny").resolve()


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (GOLDEN / "config.json").is_file():
        pytest.fail(f"golden tiny checkpoint missing at {GOLDEN}", pytrace=False)
    config, dims = SIZES["small"]
    return write_random_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "small",
        template=GOLDEN,
        config_overrides=config,
        dims_overrides=dims,
    )


def test_small_checkpoint_loads_with_its_sizes(small_dir: Path) -> None:
    from geopixel.llm import PLoRALinear
    from geopixel.modeling import GeoPixel

    model = GeoPixel.from_pretrained(small_dir, device="cpu", dtype="fp32")
    assert model.config.llm.hidden_size == 64 and model.config.llm.num_heads == 4
    assert model.config.grounding.d_model == 64 and model.config.grounding.out_dim == 64
    assert model.config.vision.hidden_size == 24  # untouched golden size
    assert model.config.vision.image_size == 224 and model.config.vision.merged_grid == 8
    assert json.loads((small_dir / "config.json").read_text())["out_dim"] == 64
    assert (small_dir / "tokenizer.model").is_file()
    for p in model.parameters():
        assert torch.isfinite(p).all()
    emb = model.llm.tok_embeddings.weight.detach()
    assert 0.14 < float(emb.std()) < 0.18  # initializer_range 0.16 (InternLM2's 0.02 at width 4096)
    plora = [m for m in model.llm.modules() if isinstance(m, PLoRALinear)]
    assert plora and all(float(m.Plora_B.weight.detach().abs().max()) == 0.0 for m in plora)
    assert all(0.14 < float(m.weight.detach().std()) < 0.18 for m in plora)


def test_sam2_features_are_not_vanishing(small_dir: Path) -> None:
    """The image encoder is initialised as the sam2 package builds it, not with std 0.02 layers."""
    from geopixel.modeling import GeoPixel

    grounding = GeoPixel.from_pretrained(small_dir, device="cpu", dtype="fp32").grounding
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
    features = grounding.encode_images(grounding.preprocess([image]))
    assert features.image_embed.shape == (1, 64, 64, 64)
    # transformers' N(0, 0.02²) init gives ~0.02 here; PyTorch's default layer init ~0.8
    assert float(features.image_embed.std()) > 0.2


def test_same_seed_same_weights_and_refuses_non_empty_output(small_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    config, dims = SIZES["small"]
    again = write_random_checkpoint(
        tmp_path / "again", template=GOLDEN, config_overrides=config, dims_overrides=dims
    )
    a, b = load_file(small_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileExistsError, match="not empty"):
        write_random_checkpoint(again, template=GOLDEN, config_overrides=config, dims_overrides=dims)
    with pytest.raises(FileNotFoundError, match="config.json"):
        write_random_checkpoint(tmp_path / "x", template=tmp_path, config_overrides={}, dims_overrides={})


def test_smaller_clip_tile_runs_inference_and_training_paths(small_dir: Path, tmp_path: Path) -> None:
    """The small size's 224 px CLIP tile (8x8 merged tokens per crop) goes through describe and training."""
    from geopixel.modeling import GeoPixel
    from geopixel.result import GeoPixelResult

    from geopixel_cli.train.evaluate import evaluate_masks
    from geopixel_cli.train.records import read_json_list
    from geopixel_cli.train.synthetic import write_dataset

    model = GeoPixel.from_pretrained(small_dir, device="cpu", dtype="fp32")
    image = np.random.default_rng(1).integers(0, 255, size=(300, 500, 3), dtype=np.uint8)
    result = model.describe(image, max_new_tokens=4)
    assert isinstance(result, GeoPixelResult)
    data = write_dataset(tmp_path / "d", n=1, seed=5, size=96, object_scale=2.0)
    scores = evaluate_masks(model, read_json_list(data["gcg"]), hd_num=1)
    assert scores.n_masks >= 1 and 0.0 <= scores.miou <= 1.0
