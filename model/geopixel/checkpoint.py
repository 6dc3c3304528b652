"""Released GeoPixel checkpoints → our modules: file reading, the key map, strict loading.

A released checkpoint directory (``MBZUAI/GeoPixel-7B`` layout, or the golden tiny fixture) holds
``config.json`` plus the weights as ``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, ``pytorch_model.bin`` or sharded ``pytorch_model-0000k-of-0000n.bin``
with ``pytorch_model.bin.index.json``. Every file is memory-mapped: a tensor's bytes are read only
when it is copied to the target device/dtype, so the never-used ``lora_sft/dpo/web`` adapters
(4.8 GB at real size) are never read. The released names are mapped to ours by one table
(``{}`` = layer index) plus prefix rules; anything missing, unexpected or of the wrong shape
raises with the full list. The model is built on the meta device and loaded with ``assign=True``.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from geopixel.config import GeoPixelConfig
from geopixel.sam2_names import expected_released_sam2_keys, map_sam2_name

__all__ = [
    "CheckpointError",
    "LazyTensor",
    "expected_released_keys",
    "load_checkpoint",
    "map_released_name",
    "open_checkpoint",
    "parse_dtype",
    "resolve_checkpoint",
    "resolve_device",
    "unused_released_keys",
]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "tokenizer.model"]


class CheckpointError(RuntimeError):
    """A checkpoint does not match the model: missing, unexpected or wrongly shaped tensors."""


@dataclass(frozen=True)
class LazyTensor:
    """A tensor of a memory-mapped checkpoint file; nothing is read until ``load()``.

    Attributes:
        shape: The stored shape.
        dtype: The stored dtype.
        loader: Returns the (memory-mapped, CPU) tensor.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    loader: Callable[[], torch.Tensor]

    def load(self) -> torch.Tensor:
        """Return the stored tensor (a view of the mapped file; pages are read on first touch)."""
        return self.loader()


# ---------------------------------------------------------------------------------------------
# Locating a checkpoint
# ---------------------------------------------------------------------------------------------


def resolve_checkpoint(path_or_id: str | Path) -> Path:
    """Return the local directory of a checkpoint given as a path or a hub id.

    A hub id (``owner/name``) is fetched with ``huggingface_hub.snapshot_download`` only when it is
    not a local directory; with ``HF_HUB_OFFLINE=1`` only the local cache is consulted.

    Args:
        path_or_id: A checkpoint directory, or a hub repository id such as ``MBZUAI/GeoPixel-7B``.

    Returns:
        The directory holding ``config.json`` and the weights.

    Raises:
        FileNotFoundError: A local path that does not exist, or a hub id that is not available
            (offline and not cached, or the download failed); the message is one line that says
            how to download it and pass ``--model DIR``.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists() or not _looks_like_hub_id(text):
        raise FileNotFoundError(f"checkpoint directory not found: {text}")
    return _snapshot(text)


def _looks_like_hub_id(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is not None and not text.startswith(".")


def _snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download  # lazy: importing geopixel touches no network code

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    try:
        folder = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=offline)
    except Exception as exc:  # noqa: BLE001 - every failure gets the same actionable message
        why = "offline and not in the local cache" if offline else f"download failed ({type(exc).__name__})"
        raise FileNotFoundError(
            f"GeoPixel checkpoint {repo_id!r} is not available ({why}): run "
            f"`hf download {repo_id} --local-dir DIR` and pass `--model DIR`"
        ) from exc
    return Path(folder)


# ---------------------------------------------------------------------------------------------
# Reading weight files (memory-mapped, lazy)
# ---------------------------------------------------------------------------------------------


def open_checkpoint(root: str | Path) -> dict[str, LazyTensor]:
    """Index every tensor of a checkpoint directory without reading any tensor data.

    Args:
        root: Directory in the released layout.

    Returns:
        Released key → lazy tensor (shape and dtype known, data memory-mapped).

    Raises:
        FileNotFoundError: No weight file in a known layout.
        CheckpointError: An index names a shard that is missing, or two files hold the same key.
    """
    root = Path(root)
    for index_name, reader in (
        ("model.safetensors.index.json", _read_safetensors),
        ("pytorch_model.bin.index.json", _read_bin),
    ):
        if (root / index_name).is_file():
            weight_map = json.loads((root / index_name).read_text())["weight_map"]
            return _read_shards(root, sorted(set(weight_map.values())), reader)
    for single, reader in (("model.safetensors", _read_safetensors), ("pytorch_model.bin", _read_bin)):
        if (root / single).is_file():
            return reader(root / single)
    raise FileNotFoundError(
        f"{root} holds no model.safetensors, pytorch_model.bin or sharded index: not a GeoPixel checkpoint"
    )


def _read_shards(
    root: Path, names: list[str], reader: Callable[[Path], dict[str, LazyTensor]]
) -> dict[str, LazyTensor]:
    out: dict[str, LazyTensor] = {}
    for name in names:
        if not (root / name).is_file():
            raise CheckpointError(f"{root}: the index names shard {name!r}, which is missing")
        shard = reader(root / name)
        clash = sorted(out.keys() & shard.keys())
        if clash:
            raise CheckpointError(f"{root / name}: keys also stored in another shard: {clash[:10]}")
        out.update(shard)
    return out


def _read_safetensors(path: Path) -> dict[str, LazyTensor]:
    """Parse the header; map the file copy-on-write so tensors are views of the mapping."""
    with path.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    base = 8 + header_len
    out: dict[str, LazyTensor] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES[meta["dtype"]]
        shape = tuple(int(s) for s in meta["shape"])
        begin, end = meta["data_offsets"]
        loader = _safetensors_loader(mapped, base + begin, end - begin, dtype, shape)
        out[key] = LazyTensor(shape, dtype, loader)
    return out


def _safetensors_loader(
    mapped: mmap.mmap, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]
) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        count = nbytes // torch.empty((), dtype=dtype).element_size()
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(mapped, dtype=dtype, count=count, offset=offset).view(shape)

    return load


def _read_bin(path: Path) -> dict[str, LazyTensor]:
    """``torch.load`` with ``mmap=True``: storages stay on disk until a tensor is touched."""
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return {k: LazyTensor(tuple(v.shape), v.dtype, _constant(v)) for k, v in state.items()}


def _constant(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: tensor


# ---------------------------------------------------------------------------------------------
# dtype / device
# ---------------------------------------------------------------------------------------------


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Resolve a dtype argument (``bf16``/``fp16``/``fp32``, a torch dtype or None).

    Args:
        dtype: Requested dtype; None picks bfloat16 on cuda/mps (as the reference runs) and float32
            on cpu.
        device: Target device.

    Returns:
        The torch dtype.

    Raises:
        ValueError: An unknown name or a non-floating dtype.
    """
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
        return DTYPE_NAMES[dtype.lower()]
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"unsupported dtype {dtype}; use bfloat16, float16 or float32")
    return dtype


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Resolve a device argument; None picks cuda, then mps, then cpu."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# The name map: released name → ours ({} = layer index)
# ---------------------------------------------------------------------------------------------

_PLORA = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
KEY_MAP: dict[str, str] = {
    "plora_glb_GN": "vision.plora_glb_GN",
    "plora_sub_GN": "vision.plora_sub_GN",
    "model.tok_embeddings.weight": "llm.tok_embeddings.weight",
    "model.layers.{}.attention_norm.weight": "llm.layers.{}.attention_norm.weight",
    "model.layers.{}.ffn_norm.weight": "llm.layers.{}.ffn_norm.weight",
    **{
        f"model.layers.{{}}.{lin}.{part}": f"llm.layers.{{}}.{lin}.{part}"
        for lin in _PLORA
        for part in ("weight", "Plora_A.weight", "Plora_B.weight")
    },
    "model.norm.weight": "llm.norm.weight",
    "output.weight": "llm.output.weight",
}
"""Exact released names (with ``{}`` for the decoder layer index) → our parameter names."""

PREFIX_MAP: dict[str, str] = {
    "vit.vision_tower.vision_model.": "vision.vit.vision_tower.vision_model.",
    "vision_proj.": "vision.vision_proj.",
    "model.text_hidden_fcs.": "grounding.text_hidden_fcs.",
}
"""Released prefixes whose remainder is identical in our modules (CLIP, projector, text MLP)."""

SAM2_PREFIX = "model.visual_model."
"""SAM-2 keys (original facebookresearch naming) go through the grounding module's converter."""


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)") + "$")


_EXACT = {k: v for k, v in KEY_MAP.items() if "{}" not in k}
_LAYERED = [(_compile(k), v) for k, v in KEY_MAP.items() if "{}" in k]


def map_released_name(name: str) -> str | None:
    """Map one released non-SAM-2 key to our name via :data:`KEY_MAP` and :data:`PREFIX_MAP`.

    Args:
        name: Released key, e.g. ``model.layers.3.attention.wqkv.Plora_A.weight``.

    Returns:
        Our key (e.g. ``llm.layers.3.attention.wqkv.Plora_A.weight``), or None when no rule
        covers it (SAM-2 keys, unused adapters and unknown names).
    """
    if name in _EXACT:
        return _EXACT[name]
    for regex, target in _LAYERED:
        match = regex.match(name)
        if match:
            return target.replace("{}", match.group(1))
    for prefix, target in PREFIX_MAP.items():
        if name.startswith(prefix):
            return target + name[len(prefix) :]
    return None


def unused_adapter_keys(cfg: GeoPixelConfig) -> dict[str, tuple[int, ...]]:
    """The never-used ``lora_sft/dpo/web`` adapter keys of the released LLM with their shapes.

    Args:
        cfg: Model configuration (layer count, widths, adapter ranks).

    Returns:
        Released key → shape, e.g. ``model.layers.0.attention.wqkv.lora_web_A.weight`` →
        ``(512, 4096)`` at real size.
    """
    llm = cfg.llm
    c, f = llm.hidden_size, llm.intermediate_size
    io = {
        "attention.wqkv": (c, llm.qkv_size),
        "attention.wo": (llm.num_heads * llm.head_dim, c),
        "feed_forward.w1": (c, f),
        "feed_forward.w3": (c, f),
        "feed_forward.w2": (f, c),
    }
    out: dict[str, tuple[int, ...]] = {}
    for layer in range(llm.num_layers):
        for lin in _PLORA:
            fan_in, fan_out = io[lin]
            for name, rank in llm.unused_adapter_ranks:
                out[f"model.layers.{layer}.{lin}.{name}_A.weight"] = (rank, fan_in)
                out[f"model.layers.{layer}.{lin}.{name}_B.weight"] = (fan_out, rank)
    return out


def expected_released_keys(cfg: GeoPixelConfig) -> dict[str, tuple[int, ...]]:
    """Every key (and shape) of a released GeoPixel checkpoint of configuration ``cfg``.

    Computed from the configuration alone, independently of our modules, including the unused
    adapters and the SAM-2 video-memory families, so that it can be checked against the real
    key listing (``geopixel_7b_state_dict_keys.tsv``).

    Args:
        cfg: Model configuration.

    Returns:
        Released key → shape.
    """
    llm, vis = cfg.llm, cfg.vision
    c = llm.hidden_size
    keys: dict[str, tuple[int, ...]] = {
        "plora_glb_GN": (1, 1, vis.merged_size),
        "plora_sub_GN": (1, 1, 1, vis.merged_size),
        "model.tok_embeddings.weight": (llm.vocab_size, c),
        "model.norm.weight": (c,),
        "output.weight": (llm.vocab_size, c),
    }
    io = {
        "attention.wqkv": (c, llm.qkv_size),
        "attention.wo": (llm.num_heads * llm.head_dim, c),
        "feed_forward.w1": (c, llm.intermediate_size),
        "feed_forward.w3": (c, llm.intermediate_size),
        "feed_forward.w2": (llm.intermediate_size, c),
    }
    for layer in range(llm.num_layers):
        p = f"model.layers.{layer}"
        keys[f"{p}.attention_norm.weight"] = (c,)
        keys[f"{p}.ffn_norm.weight"] = (c,)
        for lin, (fan_in, fan_out) in io.items():
            keys[f"{p}.{lin}.weight"] = (fan_out, fan_in)
            keys[f"{p}.{lin}.Plora_A.weight"] = (llm.plora_r, fan_in)
            keys[f"{p}.{lin}.Plora_B.weight"] = (fan_out, llm.plora_r)
    keys.update(unused_adapter_keys(cfg))
    keys.update(_clip_keys(cfg))
    keys.update({f"{SAM2_PREFIX}{k}": v for k, v in expected_released_sam2_keys(cfg.grounding).items()})
    g = cfg.grounding.out_dim
    keys.update({
        "model.text_hidden_fcs.0.0.weight": (c, c),
        "model.text_hidden_fcs.0.0.bias": (c,),
        "model.text_hidden_fcs.0.2.weight": (g, c),
        "model.text_hidden_fcs.0.2.bias": (g,),
        "vision_proj.0.weight": (vis.proj_hidden_size, vis.merged_size),
        "vision_proj.0.bias": (vis.proj_hidden_size,),
        "vision_proj.2.weight": (c, vis.proj_hidden_size),
        "vision_proj.2.bias": (c,),
    })
    return keys


def _clip_keys(cfg: GeoPixelConfig) -> dict[str, tuple[int, ...]]:
    vis = cfg.vision
    c, p = vis.hidden_size, "vit.vision_tower.vision_model"
    keys: dict[str, tuple[int, ...]] = {
        f"{p}.embeddings.class_embedding": (c,),
        f"{p}.embeddings.patch_embedding.weight": (c, 3, vis.patch_size, vis.patch_size),
        f"{p}.embeddings.position_embedding.weight": (vis.grid * vis.grid + 1, c),
    }
    for norm in ("pre_layrnorm", "post_layernorm"):
        keys.update({f"{p}.{norm}.weight": (c,), f"{p}.{norm}.bias": (c,)})
    for layer in range(vis.num_layers):
        lp = f"{p}.encoder.layers.{layer}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            keys.update({f"{lp}.self_attn.{proj}.weight": (c, c), f"{lp}.self_attn.{proj}.bias": (c,)})
        for norm in ("layer_norm1", "layer_norm2"):
            keys.update({f"{lp}.{norm}.weight": (c,), f"{lp}.{norm}.bias": (c,)})
        f = vis.intermediate_size
        keys.update({f"{lp}.mlp.fc1.weight": (f, c), f"{lp}.mlp.fc1.bias": (f,)})
        keys.update({f"{lp}.mlp.fc2.weight": (c, f), f"{lp}.mlp.fc2.bias": (c,)})
    return keys


def unused_released_keys(cfg: GeoPixelConfig) -> dict[str, tuple[int, ...]]:
    """The released keys we deliberately skip, enumerated one by one with their shapes.

    Two families: the ``lora_sft/dpo/web`` adapters of every PLoRA linear (never used by
    GeoPixel's ``infer_mode='base'``) and the SAM-2 parts only the video-memory path or
    point/box/mask prompts use (``memory_attention``, ``memory_encoder``, ``mask_downsample``,
    ``obj_ptr_proj``, ``maskmem_tpos_enc``, ``no_mem_pos_enc``, ``no_obj_ptr`` and the prompt
    encoder's point/mask embeddings), as :mod:`geopixel.sam2_names` classifies them.

    Args:
        cfg: Model configuration.

    Returns:
        Released key → shape of every skipped tensor.
    """
    out = unused_adapter_keys(cfg)
    for key, shape in expected_released_sam2_keys(cfg.grounding).items():
        if map_sam2_name(key) is None:
            out[SAM2_PREFIX + key] = shape
    return out


def released_to_ours(name: str) -> str | None:
    """Map any used released key to ours (SAM-2 included); None when no rule covers it."""
    if name.startswith(SAM2_PREFIX):
        try:
            ours = map_sam2_name(name)
        except KeyError:
            return None
        return None if ours is None else "grounding." + ours
    return map_released_name(name)


# ---------------------------------------------------------------------------------------------
# Strict loading
# ---------------------------------------------------------------------------------------------


def plan_load(
    released: Mapping[str, LazyTensor], expected: Mapping[str, tuple[int, ...]], cfg: GeoPixelConfig
) -> dict[str, LazyTensor]:
    """Match a checkpoint's tensors to our parameter names, strictly.

    Args:
        released: The checkpoint index (:func:`open_checkpoint`).
        expected: Our state-dict names → shapes (from the model built on the meta device).
        cfg: Configuration (to enumerate the keys that are skipped on purpose).

    Returns:
        Our name → lazy tensor, exactly the keys of ``expected``. Skipped keys are never read.

    Raises:
        CheckpointError: Listing every missing, unexpected and wrongly shaped tensor.
    """
    skip = unused_released_keys(cfg)
    plan: dict[str, LazyTensor] = {}
    unexpected: list[str] = []
    bad_shape: list[str] = []
    for name, lazy in released.items():
        if name in skip and skip[name] == lazy.shape:
            continue
        ours = released_to_ours(name)
        if ours is None or ours not in expected or ours in plan:
            unexpected.append(name)
        elif tuple(expected[ours]) != lazy.shape:
            bad_shape.append(f"{name}: checkpoint {list(lazy.shape)} vs model {list(expected[ours])}")
        else:
            plan[ours] = lazy
    missing = sorted(set(expected) - set(plan) - {_ours_of_bad(b) for b in bad_shape})
    groups = (("missing", missing), ("unexpected", sorted(unexpected)), ("wrong shape", bad_shape))
    problems = [f"{label} ({len(items)}): {', '.join(items)}" for label, items in groups if items]
    if problems:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems))
    return plan


def _ours_of_bad(entry: str) -> str:
    return released_to_ours(entry.split(":", 1)[0]) or ""


def load_checkpoint(
    model: nn.Module,
    path_or_id: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> nn.Module:
    """Load a released checkpoint into ``model`` (built on the meta device) with ``assign=True``.

    Args:
        model: A ``GeoPixel`` whose parameters are on the meta device (or anywhere: they are
            replaced). Must have a ``config`` attribute (:class:`GeoPixelConfig`).
        path_or_id: Checkpoint directory or hub id (see :func:`resolve_checkpoint`).
        device: Target device (``cuda``, ``cpu``, ``mps``); None picks the best available.
        dtype: Floating dtype of the weights (``bf16``/``fp16``/``fp32``); None = bf16 on
            accelerators, fp32 on cpu.

    Returns:
        The same model, on ``device``, in eval mode.

    Raises:
        CheckpointError: Missing, unexpected or wrongly shaped tensors (all listed).
        FileNotFoundError: No checkpoint at that path / id.
    """
    cfg: GeoPixelConfig = model.config  # type: ignore[assignment]
    target = resolve_device(device)
    want = parse_dtype(dtype, target)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan = plan_load(open_checkpoint(resolve_checkpoint(path_or_id)), expected, cfg)
    state = {k: _to(lazy.load(), target, want) for k, lazy in plan.items()}
    model.load_state_dict(state, strict=True, assign=True)
    materialize_buffers(model, device=target)
    return model.eval()


def _to(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)


def materialize_buffers(model: nn.Module, *, device: torch.device) -> None:
    """Recompute the buffers that are not in the checkpoint (left on the meta device) on ``device``.

    The only such buffers are CLIP's ``position_ids`` (``arange`` over the position table); RoPE
    tables are computed on the fly by the LLM and KV caches are allocated per generation.

    Raises:
        CheckpointError: A parameter or buffer is still on the meta device afterwards.
    """
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is None or not buf.is_meta:
                continue
            if name == "position_ids":
                value = torch.arange(buf.shape[-1], device=device).expand(buf.shape).contiguous()
                module.register_buffer(name, value, persistent=False)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"tensors left uninitialised (meta) after loading: {', '.join(left)}")
