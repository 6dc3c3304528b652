"""Configuration dataclasses for GeoPixel and the named presets.

Every size the network needs lives here, once. The released checkpoints carry only the LLM
fields in their ``config.json``; the sizes the reference code hard-codes (CLIP tower, SAM-2,
projector, PLoRA ranks) come from a ``tiny_dims.json`` next to it when present (the golden
fixture), else they are the released model's values (CLIP ViT-L/14-560, SAM-2 Hiera-L). They are
never inferred from the weights' shapes: a checkpoint whose tensors disagree fails to load.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LLMConfig:
    """InternLM2 decoder sizes (ARCHITECTURE.md §2, §6).

    Attributes:
        vocab_size: Rows of ``tok_embeddings`` and ``output`` (92553 in GeoPixel).
        hidden_size: Model width.
        num_layers: Decoder blocks.
        num_heads: Query heads.
        num_kv_heads: Key/value heads (GQA).
        intermediate_size: SwiGLU inner width.
        rms_norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base.
        rope_scaling_factor: Dynamic-NTK factor (only active past ``max_position_embeddings``).
        max_position_embeddings: Size of the RoPE table built at construction.
        max_length: The reference's context limit (it silently truncates there; we refuse).
        plora_r: Partial-LoRA rank.
        plora_alpha: Partial-LoRA alpha (scaling = alpha / r).
        unused_adapter_ranks: Ranks of the checkpoint's never-used ``lora_sft/dpo/web`` adapters
            (only needed to list or skip their keys; never built).
        pad_token_id: ``padding_idx`` of the embedding (gradients only).
        bos_token_id: ``<s>``.
        eos_token_id: ``</s>``: the only stop token of the reference.
    """

    vocab_size: int = 92553
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    intermediate_size: int = 14336
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    rope_scaling_factor: float = 2.0
    max_position_embeddings: int = 24576
    max_length: int = 16384
    plora_r: int = 256
    plora_alpha: int = 256
    unused_adapter_ranks: tuple[tuple[str, int], ...] = (
        ("lora_sft", 256),
        ("lora_dpo", 256),
        ("lora_web", 512),
    )
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden {self.hidden_size}, heads {self.num_heads}, "
                f"kv heads {self.num_kv_heads} do not divide"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    @property
    def num_groups(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def qkv_size(self) -> int:
        """Output rows of the fused ``wqkv``: kv_heads × (groups + 2) × head_dim."""
        return self.num_kv_heads * (self.num_groups + 2) * self.head_dim

    @property
    def plora_scaling(self) -> float:
        """Partial-LoRA scaling alpha / r."""
        return self.plora_alpha / self.plora_r


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT tower, token merge and projector (ARCHITECTURE.md §4).

    Attributes:
        hidden_size: CLIP width (1024 for ViT-L).
        num_layers: Encoder layers.
        num_heads: Attention heads.
        intermediate_size: CLIP MLP width.
        image_size: Crop size in pixels (560).
        patch_size: Patch size (14): 40×40 patches per crop.
        hidden_act: CLIP activation (``quick_gelu``).
        layer_norm_eps: LayerNorm epsilon.
        projection_dim: CLIP projection width (config only; not used by GeoPixel).
        proj_hidden_size: Width of the projector's hidden layer (``mm_mid_hidden_size``).
    """

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 560
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    proj_hidden_size: int = 4096

    @property
    def merged_size(self) -> int:
        """Width of a 2×2-merged token, of the GN separators and of the projector input."""
        return 4 * self.hidden_size

    @property
    def grid(self) -> int:
        """Patches per crop side (40)."""
        return self.image_size // self.patch_size

    @property
    def merged_grid(self) -> int:
        """Merged tokens per crop side (20)."""
        return self.grid // 2


@dataclass(frozen=True)
class GroundingConfig:
    """SAM-2 (2.0, Hiera) image encoder, prompt encoder and mask decoder (ARCHITECTURE.md §8).

    Attributes:
        image_size: SAM input side (1024).
        hiera_embed_dim: Hiera stage-1 width.
        hiera_num_heads: Hiera stage-1 heads.
        hiera_stages: Blocks per stage.
        hiera_global_att_blocks: Blocks with global attention.
        hiera_window_spec: Window size per stage.
        hiera_window_pos_embed_bkg: Background positional-embedding size.
        backbone_channel_list: FPN input widths, deepest first.
        d_model: Neck / prompt / decoder width.
        mlp_dim: TwoWayTransformer MLP width.
        iou_head_hidden_dim: IoU head width.
        out_dim: Width of the projected ``[SEG]`` prompt (= d_model in the released model).
        memory_attention_ffn: Unused memory attention FFN width (checkpoint keys only).
        memory_attention_layers: Unused memory attention layers (checkpoint keys only).
        memory_kv_in_dim: Unused memory attention kv width (checkpoint keys only).
        memory_out_dim: Unused memory encoder output width (checkpoint keys only).
        stability_delta: Dynamic-multimask stability threshold offset.
        stability_thresh: Dynamic-multimask stability threshold.
    """

    image_size: int = 1024
    hiera_embed_dim: int = 144
    hiera_num_heads: int = 2
    hiera_stages: tuple[int, ...] = (2, 6, 36, 4)
    hiera_global_att_blocks: tuple[int, ...] = (23, 33, 43)
    hiera_window_spec: tuple[int, ...] = (8, 4, 16, 8)
    hiera_window_pos_embed_bkg: tuple[int, int] = (7, 7)
    backbone_channel_list: tuple[int, ...] = (1152, 576, 288, 144)
    d_model: int = 256
    mlp_dim: int = 2048
    iou_head_hidden_dim: int = 256
    out_dim: int = 256
    memory_attention_ffn: int = 2048
    memory_attention_layers: int = 4
    memory_kv_in_dim: int = 64
    memory_out_dim: int = 64
    stability_delta: float = 0.05
    stability_thresh: float = 0.98


@dataclass(frozen=True)
class GeoPixelConfig:
    """The whole model.

    Attributes:
        llm: Language model sizes.
        vision: CLIP tower and projector sizes.
        grounding: SAM-2 sizes.
        seg_token_id: Id of ``[SEG]`` (read from ``added_tokens.json`` when present).
        bop_token_id: Id of ``<p>``.
        eop_token_id: Id of ``</p>``.
        im_end_token_id: ``[UNUSED_TOKEN_145]`` (end of a turn).
        im_start_token_id: ``[UNUSED_TOKEN_146]`` (start of a turn).
        default_hd_num: Crop budget used by the reference at inference (9).
        name: Preset or checkpoint name, for logs.
    """

    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    seg_token_id: int = 92550
    bop_token_id: int = 92551
    eop_token_id: int = 92552
    im_end_token_id: int = 92542
    im_start_token_id: int = 92543
    default_hd_num: int = 9
    name: str = "geopixel-7b"

    def replace(self, **changes: Any) -> GeoPixelConfig:
        """Return a copy with top-level fields replaced."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_name(cls, name: str) -> GeoPixelConfig:
        """Return a named preset (``geopixel-7b``, ``geopixel-7b-res``, ``tiny``).

        Args:
            name: Preset name.

        Returns:
            The preset configuration.

        Raises:
            KeyError: Unknown preset (the message lists the known ones).
        """
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]

    @classmethod
    def from_dir(cls, path: str | Path) -> GeoPixelConfig:
        """Read a checkpoint directory's ``config.json`` (+ ``tiny_dims.json``, ``added_tokens.json``).

        Args:
            path: Checkpoint directory in the released layout.

        Returns:
            The configuration. Sizes the directory does not carry default to the released model's.

        Raises:
            FileNotFoundError: No ``config.json`` in the directory.
        """
        root = Path(path)
        cfg_file = root / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{root} has no config.json: not a GeoPixel checkpoint directory")
        raw = json.loads(cfg_file.read_text())
        dims: dict[str, Any] = {}
        if (root / "tiny_dims.json").is_file():
            dims = json.loads((root / "tiny_dims.json").read_text())
        return cls.from_dicts(raw, dims, _read_added_tokens(root), name=root.name)

    @classmethod
    def from_dicts(
        cls,
        raw: dict[str, Any],
        dims: dict[str, Any] | None = None,
        added_tokens: dict[str, int] | None = None,
        *,
        name: str = "checkpoint",
    ) -> GeoPixelConfig:
        """Build from a parsed ``config.json`` and the optional hard-coded-size table.

        Args:
            raw: Parsed ``config.json`` (InternLMXcomposer2Config schema + GeoPixel extras).
            dims: Parsed ``tiny_dims.json`` (top-level keys as in the golden fixture) or None.
            added_tokens: Parsed ``added_tokens.json`` or None.
            name: Name for logs.

        Returns:
            The configuration.
        """
        dims = dims or {}
        llm = LLMConfig(
            vocab_size=int(raw.get("vocab_size", 92553)),
            hidden_size=int(raw["hidden_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=int(raw["num_attention_heads"]),
            num_kv_heads=int(raw.get("num_key_value_heads", raw["num_attention_heads"])),
            intermediate_size=int(raw["intermediate_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=float(raw.get("rope_theta", 1e6)),
            rope_scaling_factor=float((raw.get("rope_scaling") or {}).get("factor", 2.0)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 24576)),
            max_length=int(raw.get("max_length", 16384)),
            plora_r=int(dims.get("plora_r", 256)),
            plora_alpha=int(dims.get("plora_alpha", 256)),
            unused_adapter_ranks=(
                ("lora_sft", int(dims.get("lora_sft_r", 256))),
                ("lora_dpo", int(dims.get("lora_dpo_r", 256))),
                ("lora_web", int(dims.get("lora_web_r", 512))),
            ),
            pad_token_id=int(raw.get("pad_token_id", 0) or 0),
            bos_token_id=int(raw.get("bos_token_id", 1)),
            eos_token_id=int(raw.get("eos_token_id", 2)),
        )
        clip = dims.get("clip", {})
        vision = VisionConfig(
            hidden_size=int(clip.get("hidden_size", 1024)),
            num_layers=int(clip.get("num_hidden_layers", 24)),
            num_heads=int(clip.get("num_attention_heads", 16)),
            intermediate_size=int(clip.get("intermediate_size", 4096)),
            image_size=int(clip.get("image_size", 560)),
            patch_size=int(clip.get("patch_size", 14)),
            hidden_act=str(clip.get("hidden_act", "quick_gelu")),
            layer_norm_eps=float(clip.get("layer_norm_eps", 1e-5)),
            projection_dim=int(clip.get("projection_dim", 768)),
            proj_hidden_size=int(dims.get("mm_mid_hidden_size", llm.hidden_size)),
        )
        sam = dims.get("sam2", {})
        hiera = sam.get("hiera", {})
        mem_att = sam.get("memory_attention", {})
        mem_enc = sam.get("memory_encoder", {})
        out_dim = int(raw.get("out_dim", dims.get("out_dim", 256)))
        grounding = GroundingConfig(
            image_size=int(sam.get("image_size", 1024)),
            hiera_embed_dim=int(hiera.get("embed_dim", 144)),
            hiera_num_heads=int(hiera.get("num_heads", 2)),
            hiera_stages=tuple(hiera.get("stages", (2, 6, 36, 4))),
            hiera_global_att_blocks=tuple(hiera.get("global_att_blocks", (23, 33, 43))),
            hiera_window_spec=tuple(hiera.get("window_spec", (8, 4, 16, 8))),
            hiera_window_pos_embed_bkg=tuple(hiera.get("window_pos_embed_bkg_spatial_size", (7, 7))),  # type: ignore[arg-type]
            backbone_channel_list=tuple(sam.get("backbone_channel_list", (1152, 576, 288, 144))),
            d_model=int(sam.get("d_model", 256)),
            mlp_dim=int(sam.get("sam_mlp_dim", 2048)),
            iou_head_hidden_dim=int(sam.get("sam_iou_head_hidden_dim", 256)),
            out_dim=out_dim,
            memory_attention_ffn=int(mem_att.get("dim_feedforward", 2048)),
            memory_attention_layers=int(mem_att.get("num_layers", 4)),
            memory_kv_in_dim=int(mem_att.get("kv_in_dim", 64)),
            memory_out_dim=int(mem_enc.get("out_dim", 64)),
        )
        tokens = added_tokens or {}
        return cls(
            llm=llm,
            vision=vision,
            grounding=grounding,
            seg_token_id=int(tokens.get("[SEG]", 92550)),
            bop_token_id=int(tokens.get("<p>", 92551)),
            eop_token_id=int(tokens.get("</p>", 92552)),
            name=name,
        )


def _read_added_tokens(root: Path) -> dict[str, int]:
    path = root / "added_tokens.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {str(k): int(v) for k, v in data.items()}


def _tiny() -> GeoPixelConfig:
    """The golden fixture's sizes (../shared/golden/reference-tiny): fast random-weight tests."""
    return GeoPixelConfig(
        llm=LLMConfig(
            hidden_size=32,
            num_layers=2,
            num_heads=8,
            num_kv_heads=2,
            intermediate_size=112,
            plora_r=8,
            plora_alpha=8,
            unused_adapter_ranks=(("lora_sft", 4), ("lora_dpo", 4), ("lora_web", 8)),
        ),
        vision=VisionConfig(
            hidden_size=24,
            num_layers=2,
            num_heads=3,
            intermediate_size=96,
            projection_dim=16,
            proj_hidden_size=32,
        ),
        grounding=GroundingConfig(
            hiera_embed_dim=8,
            hiera_num_heads=1,
            hiera_stages=(1, 2, 3, 1),
            hiera_global_att_blocks=(4, 5),
            backbone_channel_list=(64, 32, 16, 8),
            d_model=16,
            mlp_dim=32,
            iou_head_hidden_dim=16,
            out_dim=16,
            memory_attention_ffn=32,
            memory_kv_in_dim=8,
            memory_out_dim=8,
        ),
        name="tiny",
    )


PRESETS: dict[str, GeoPixelConfig] = {
    "geopixel-7b": GeoPixelConfig(name="geopixel-7b"),
    # The RES model is GeoPixel-7B fine-tuned on RRSIS-D (finetune.sh): same architecture and sizes.
    "geopixel-7b-res": GeoPixelConfig(name="geopixel-7b-res"),
    "tiny": _tiny(),
}
