"""Checkpoint loading: real 7B key structure, strict map, file layouts, offline hub ids, dtypes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from geopixel import checkpoint as ckpt
from geopixel.checkpoint import (
    CheckpointError,
    LazyTensor,
    expected_released_keys,
    open_checkpoint,
    plan_load,
    released_to_ours,
    unused_released_keys,
)
from geopixel.config import GeoPixelConfig
from geopixel.modeling import GeoPixel
from safetensors.torch import load_file, save_file

TSV = Path(__file__).resolve().parents[2] / ".." / "shared" / "reference" / "geopixel_7b_state_dict_keys.tsv"
TOKENIZER_FILES = (
    "config.json", "tiny_dims.json", "added_tokens.json", "special_tokens_map.json", "tokenizer.model"
)
# The SAM-2 families that only the video-memory path or point/box/mask prompts use (ARCHITECTURE §1.3).
SAM2_UNUSED_FAMILIES = (
    "memory_attention.", "memory_encoder.", "mask_downsample.", "obj_ptr_proj.", "maskmem_tpos_enc",
    "no_mem_pos_enc", "no_obj_ptr", "sam_prompt_encoder.point_embeddings.",
    "sam_prompt_encoder.not_a_point_embed.", "sam_prompt_encoder.mask_downscaling.",
)


def _read_tsv() -> dict[str, tuple[int, ...]]:
    if not TSV.is_file():
        pytest.fail(f"reference key listing missing: {TSV}", pytrace=False)
    out = {}
    for line in TSV.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")
        out[key] = tuple(int(s) for s in shape.split("x"))
    return out


def _meta_model(name_or_cfg: str | GeoPixelConfig) -> GeoPixel:
    cfg = GeoPixelConfig.from_name(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    with torch.device("meta"):
        return GeoPixel(cfg)


@pytest.fixture(scope="module")
def tiny_cfg(golden_dir: Path) -> GeoPixelConfig:
    return GeoPixelConfig.from_dir(golden_dir)


@pytest.fixture(scope="module")
def tiny_expected(tiny_cfg: GeoPixelConfig) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _meta_model(tiny_cfg).state_dict().items()}


@pytest.fixture(scope="module")
def golden_state(golden_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(golden_dir / "model.safetensors")


def _checkpoint_dir(tmp: Path, golden_dir: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(golden_dir / name, tmp / name)
    return tmp


# ---- real structure ---------------------------------------------------------------------------


def test_expected_released_keys_equal_the_real_7b_listing() -> None:
    assert expected_released_keys(GeoPixelConfig.from_name("geopixel-7b")) == _read_tsv()


def test_7b_preset_on_meta_has_exactly_the_mapped_real_keys_and_shapes() -> None:
    cfg = GeoPixelConfig.from_name("geopixel-7b")
    real = _read_tsv()
    unused = unused_released_keys(cfg)
    ours = {k: tuple(v.shape) for k, v in _meta_model(cfg).state_dict().items()}
    mapped = {released_to_ours(k): shape for k, shape in real.items() if k not in unused}
    assert None not in mapped
    assert len(mapped) == len(real) - len(unused)  # the map is injective
    assert ours == mapped


def test_skipped_keys_are_exactly_the_documented_unused_sets() -> None:
    cfg = GeoPixelConfig.from_name("geopixel-7b")
    real = _read_tsv()
    unused = unused_released_keys(cfg)
    assert all(real[k] == shape for k, shape in unused.items())
    adapters = {k for k in unused if k.startswith("model.layers.")}
    sam = {k.removeprefix("model.visual_model.") for k in unused} - {
        k.removeprefix("model.visual_model.") for k in adapters
    }
    assert len(adapters) == 32 * 5 * 6  # layers x PLoRA linears x {sft, dpo, web} x {A, B}
    assert all(k.split(".")[-2].rsplit("_", 1)[0] in {"lora_sft", "lora_dpo", "lora_web"} for k in adapters)
    assert all(k.startswith(SAM2_UNUSED_FAMILIES) for k in sam)
    assert len(sam) == sum(1 for k in real if k.startswith("model.visual_model.") and
                           k.removeprefix("model.visual_model.").startswith(SAM2_UNUSED_FAMILIES))
    adapter_params = sum(torch.Size(real[k]).numel() for k in adapters)
    assert adapter_params == 2_415_919_104  # ~4.8 GB in bf16, never read


def test_tiny_checkpoint_keys_match_the_tiny_config(golden_dir: Path, tiny_cfg: GeoPixelConfig) -> None:
    index = open_checkpoint(golden_dir)
    assert {k: v.shape for k, v in index.items()} == expected_released_keys(tiny_cfg)


# ---- strict loading ---------------------------------------------------------------------------


def _golden_index(golden_dir: Path) -> dict[str, LazyTensor]:
    return dict(open_checkpoint(golden_dir))


def test_plan_covers_every_parameter(
    golden_dir: Path, tiny_cfg: GeoPixelConfig, tiny_expected: dict
) -> None:
    plan = plan_load(_golden_index(golden_dir), tiny_expected, tiny_cfg)
    assert set(plan) == set(tiny_expected)


def test_missing_key_raises_with_its_name(
    golden_dir: Path, tiny_cfg: GeoPixelConfig, tiny_expected: dict
) -> None:
    index = _golden_index(golden_dir)
    del index["model.layers.1.feed_forward.w2.Plora_B.weight"]
    with pytest.raises(CheckpointError, match=r"missing \(1\): llm\.layers\.1\.feed_forward\.w2\.Plora_B"):
        plan_load(index, tiny_expected, tiny_cfg)


def test_unexpected_key_raises_with_its_name(
    golden_dir: Path, tiny_cfg: GeoPixelConfig, tiny_expected: dict
) -> None:
    index = _golden_index(golden_dir)
    index["model.layers.0.attention.wqkv.lora_new_A.weight"] = LazyTensor((4, 32), torch.float32, torch.zeros)
    index["model.visual_model.some_new_head.weight"] = LazyTensor((1,), torch.float32, torch.zeros)
    with pytest.raises(CheckpointError) as err:
        plan_load(index, tiny_expected, tiny_cfg)
    listed = "model.layers.0.attention.wqkv.lora_new_A.weight, model.visual_model.some_new_head.weight"
    assert f"unexpected (2): {listed}" in str(err.value)
    assert "missing" not in str(err.value)


def test_wrong_shape_raises_with_both_shapes(
    golden_dir: Path, tiny_cfg: GeoPixelConfig, tiny_expected: dict
) -> None:
    index = _golden_index(golden_dir)
    index["model.norm.weight"] = LazyTensor((33,), torch.float32, lambda: torch.zeros(33))
    # An unused adapter with a shape the config does not predict is not silently skipped either.
    index["model.layers.0.attention.wo.lora_web_A.weight"] = LazyTensor((9, 32), torch.float32, torch.zeros)
    with pytest.raises(CheckpointError) as err:
        plan_load(index, tiny_expected, tiny_cfg)
    msg = str(err.value)
    assert "wrong shape (1): model.norm.weight: checkpoint [33] vs model [32]" in msg
    assert "unexpected (1): model.layers.0.attention.wo.lora_web_A.weight" in msg
    assert "missing" not in msg


def test_load_never_reads_skipped_tensors(golden_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = _golden_index(golden_dir)
    read: list[str] = []

    def spy(name: str, lazy: LazyTensor) -> LazyTensor:
        return LazyTensor(lazy.shape, lazy.dtype, lambda: (read.append(name), lazy.load())[1])

    monkeypatch.setattr(ckpt, "open_checkpoint", lambda root: {k: spy(k, v) for k, v in index.items()})
    model = GeoPixel.from_pretrained(golden_dir, device="cpu", dtype="fp32")
    unused = unused_released_keys(model.config)
    assert len(unused) == 232 and not set(read) & set(unused)
    assert len(read) == len(index) - len(unused)


# ---- file layouts -----------------------------------------------------------------------------


def _shards(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    keys = sorted(state)
    return [{k: state[k].contiguous() for k in keys[i::n]} for i in range(n)]


def _write_sharded(root: Path, state: dict[str, torch.Tensor], *, fmt: str, n: int = 3) -> None:
    weight_map = {}
    for i, shard in enumerate(_shards(state, n), start=1):
        name = (f"model-{i:05d}-of-{n:05d}.safetensors" if fmt == "safetensors"
                else f"pytorch_model-{i:05d}-of-{n:05d}.bin")
        if fmt == "safetensors":
            save_file(shard, root / name)
        else:
            torch.save(shard, root / name)
        weight_map.update(dict.fromkeys(shard, name))
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (root / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _assert_loaded(model: GeoPixel, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    ours = model.state_dict()
    for key, value in state.items():
        target = released_to_ours(key)
        if target is None:
            continue
        assert ours[target].dtype == dtype
        assert torch.equal(ours[target].float(), value.to(dtype).float()), key
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    buffers = dict(model.named_buffers())
    position_ids = buffers["vision.vit.vision_tower.vision_model.embeddings.position_ids"]
    assert torch.equal(position_ids, torch.arange(1601)[None])


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_round_trip(tmp_path: Path, golden_dir: Path, golden_state: dict, fmt: str) -> None:
    root = _checkpoint_dir(tmp_path / fmt, golden_dir)
    _write_sharded(root, golden_state, fmt=fmt)
    model = GeoPixel.from_pretrained(root, device="cpu", dtype="fp32")
    _assert_loaded(model, golden_state, torch.float32)


def test_single_bin_in_bf16(tmp_path: Path, golden_dir: Path, golden_state: dict) -> None:
    root = _checkpoint_dir(tmp_path / "bin1", golden_dir)
    torch.save({k: v.to(torch.bfloat16) for k, v in golden_state.items()}, root / "pytorch_model.bin")
    model = GeoPixel.from_pretrained(root, device="cpu", dtype=torch.bfloat16)
    _assert_loaded(model, golden_state, torch.bfloat16)


def test_missing_shard_and_missing_weights_raise(
    tmp_path: Path, golden_dir: Path, golden_state: dict
) -> None:
    root = _checkpoint_dir(tmp_path / "broken", golden_dir)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        open_checkpoint(root)
    _write_sharded(root, golden_state, fmt="safetensors")
    (root / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        open_checkpoint(root)


# ---- locating, dtype, device --------------------------------------------------------------------


def test_offline_hub_id_gives_one_line_download_hint(tmp_path: Path) -> None:
    code = (
        "from geopixel.checkpoint import resolve_checkpoint\n"
        "try:\n    resolve_checkpoint('geopixel-tests/no-such-model')\n"
        "except FileNotFoundError as e:\n    print(str(e))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout + out.stderr
    assert "hf download geopixel-tests/no-such-model --local-dir DIR" in lines[0]
    assert "--model DIR" in lines[0]


def test_missing_local_path_is_not_treated_as_hub_id(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        ckpt.resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        ckpt.resolve_checkpoint("./relative/dir")


def test_dtype_and_device_parsing() -> None:
    cpu = torch.device("cpu")
    assert ckpt.parse_dtype(None, cpu) == torch.float32
    assert ckpt.parse_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert ckpt.parse_dtype("bf16", cpu) == torch.bfloat16
    assert ckpt.parse_dtype("fp16", cpu) == torch.float16
    assert ckpt.parse_dtype(torch.float32, cpu) == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        ckpt.parse_dtype("int8", cpu)
    with pytest.raises(ValueError, match="unsupported dtype"):
        ckpt.parse_dtype(torch.int8, cpu)
    assert ckpt.resolve_device("cpu") == cpu
