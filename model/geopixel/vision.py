"""Image side of GeoPixel: CLIP ViT tower, 2×2 token merge, separator tokens, projector.

ARCHITECTURE.md §4. For each image the CLIP batch is ``[global view, tile(0,0), tile(0,1), ...]``
(see :mod:`geopixel.hd_divider`); the tower's last encoder layer (before ``post_layernorm``, CLS
dropped) gives 40×40 patch features per crop, merged 2×2 into 20×20 tokens of width 4·C with
channel order (dy, dx, C). The sequence is the global view's 20 rows each followed by
``plora_sub_GN`` (the global rows use the *sub* separator), one ``plora_glb_GN``, then the tiles
laid out on one (20h)×(20w) raster, each row followed by ``plora_sub_GN``. The projector
(Linear, exact GELU, Linear) runs on every token, separators included.

Parameter names mirror the released checkpoint relative to this module: ``vit.vision_tower.
vision_model.*`` (CLIP), ``vision_proj.{0,2}.*``, ``plora_glb_GN`` (1, 1, 4C), ``plora_sub_GN``
(1, 1, 1, 4C), so those keys load with ``load_state_dict(strict=True)`` unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from geopixel.config import GeoPixelConfig, VisionConfig
from geopixel.hd_divider import Rule, apply_grid, crops_for_clip, image_token_count, normalize_clip, plan_grid


def _clip_config(config: VisionConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_channels=3,
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        projection_dim=config.projection_dim,
        attention_dropout=0.0,
    )


class VisionTower(nn.Module):
    """CLIP tower + merge + GN separators + projector: crops in, image-token embeddings out.

    Args:
        config: CLIP and projector sizes.
        out_size: Projector output width = the LLM hidden size.
    """

    def __init__(self, config: VisionConfig, *, out_size: int) -> None:
        super().__init__()
        self.config = config
        width = config.merged_size
        # Nested containers reproduce the reference attribute path vit.vision_tower.vision_model.
        clip = CLIPVisionModel(_clip_config(config))
        self.vit = nn.ModuleDict({"vision_tower": nn.ModuleDict({"vision_model": clip})})
        self.vision_proj = nn.Sequential(
            nn.Linear(width, config.proj_hidden_size),
            nn.GELU(),  # exact (erf) form
            nn.Linear(config.proj_hidden_size, out_size),
        )
        self.plora_glb_GN = nn.Parameter(torch.zeros(1, 1, width))
        self.plora_sub_GN = nn.Parameter(torch.zeros(1, 1, 1, width))

    @classmethod
    def from_config(cls, config: GeoPixelConfig) -> VisionTower:
        """Build the tower of a whole-model config (projector output = LLM hidden size)."""
        return cls(config.vision, out_size=config.llm.hidden_size)

    @property
    def clip(self) -> CLIPVisionModel:
        """The HF CLIP vision model (``vit.vision_tower.vision_model``)."""
        return self.vit["vision_tower"]["vision_model"]  # type: ignore[index,return-value]

    def patch_features(self, pixel_crops: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """CLIP last-layer patch features (before ``post_layernorm``), CLS dropped.

        The crops are cast to the module's dtype where they are (the CPU, typically) and moved
        to its device one chunk at a time, so the device never holds a float32 copy of the
        whole batch (about 1.1 GB for 20 tiles of 10 crops).

        Args:
            pixel_crops: ``(N, 3, S, S)`` normalized crops (any float dtype, any device).
            batch_size: Crops per CLIP call (all at once when None); bounds attention memory.

        Returns:
            ``(N, (S/patch)², C)`` in the module's dtype, on its device.
        """
        ref = self.plora_glb_GN
        x = pixel_crops.to(dtype=ref.dtype)  # (N, 3, S, S), still where the caller made it
        step = batch_size or max(1, x.shape[0])
        outs = [
            self.clip(pixel_values=chunk.to(ref.device)).last_hidden_state[:, 1:] for chunk in x.split(step)
        ]
        return torch.cat(outs, dim=0)  # (N, P, C)

    def arrange(self, features: torch.Tensor, grids: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Merge 2×2 and insert the separators: the pre-projector sequence of each image.

        Args:
            features: ``(sum(1 + h·w), P, C)`` patch features, images back to back.
            grids: ``(h, w)`` tile grid of each image, in order.

        Returns:
            One ``(L_i, 4C)`` tensor per image, ``L_i = (h·w + 1)·400 + 1 + (h + 1)·20``.
        """
        counts = [1 + h * w for h, w in grids]
        if sum(counts) != features.shape[0]:
            raise ValueError(f"{features.shape[0]} crops given but the grids need {sum(counts)}")
        merged = self._merge(features)  # (N, g, g, 4C)
        return [self._layout(m, h, w) for m, (h, w) in zip(merged.split(counts), grids, strict=True)]

    def forward(
        self, pixel_crops: torch.Tensor, grids: Sequence[tuple[int, int]], *, batch_size: int | None = None
    ) -> list[torch.Tensor]:
        """Embed the crops of one or more images.

        Args:
            pixel_crops: ``(sum(1 + h·w), 3, S, S)``: each image's :func:`crops_for_clip` output,
                concatenated in image order.
            grids: ``(h, w)`` of each image.
            batch_size: Crops per CLIP call (all at once when None).

        Returns:
            One ``(L_i, out_size)`` tensor per image, in the module's dtype.
        """
        seqs = self.arrange(self.patch_features(pixel_crops, batch_size=batch_size), grids)
        projected = self.vision_proj(torch.cat(seqs, dim=0))  # (sum L_i, out_size)
        return list(projected.split([s.shape[0] for s in seqs]))

    def encode_images(
        self,
        images: Sequence[np.ndarray],
        hd_num: int,
        *,
        rule: Rule = "inference",
        max_tiles: int | None = None,
        batch_size: int | None = None,
    ) -> list[torch.Tensor]:
        """Divide, normalize and embed RGB images (the reference ``encode_img`` for each).

        Args:
            images: ``(H, W, 3)`` uint8 RGB arrays.
            hd_num: Crop budget (see :func:`geopixel.hd_divider.plan_grid`).
            rule: ``"inference"`` or ``"training"`` divider.
            max_tiles: Optional cap on tiles per image (images above it are downscaled).
            batch_size: Crops per CLIP call (all at once when None).

        Returns:
            One ``(L_i, out_size)`` tensor per image.
        """
        crops, grids = [], []
        for image in images:
            tile = self.config.image_size
            height, width = image.shape[:2]
            grid = plan_grid(width, height, hd_num, rule=rule, max_tiles=max_tiles, tile=tile)
            crops.append(crops_for_clip(normalize_clip(apply_grid(image, grid)), grid, tile=tile))
            grids.append((grid.rows, grid.cols))
        return self(torch.cat(crops, dim=0), grids, batch_size=batch_size)

    def _merge(self, features: torch.Tensor) -> torch.Tensor:
        n, p, c = features.shape
        side = self.config.grid
        if p != side * side:
            raise ValueError(f"expected {side}x{side} patches per crop, got {p}")
        g = side // 2
        x = features.reshape(n, g, 2, g, 2, c).permute(0, 1, 3, 2, 4, 5)  # (N, g, g, dy, dx, C)
        return x.reshape(n, g, g, 4 * c)  # (N, g, g, 4C), channel = (dy·2 + dx)·C + k

    def _layout(self, merged: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        _, g, _, width = merged.shape  # (1 + h·w, g, g, 4C)
        sub_gn = self.plora_sub_GN.reshape(1, 1, width).to(merged.dtype)
        glb = torch.cat([merged[0], sub_gn.expand(g, 1, width)], dim=1)  # (g, g + 1, 4C)
        tiles = merged[1:].reshape(rows, cols, g, g, width).permute(0, 2, 1, 3, 4)  # (h, g, w, g, 4C)
        tiles = tiles.reshape(rows * g, cols * g, width)
        tiles = torch.cat([tiles, sub_gn.expand(rows * g, 1, width)], dim=1)  # (h·g, w·g + 1, 4C)
        glb_gn = self.plora_glb_GN.reshape(1, width).to(merged.dtype)
        seq = torch.cat([glb.reshape(-1, width), glb_gn, tiles.reshape(-1, width)], dim=0)  # (L, 4C)
        assert seq.shape[0] == image_token_count(rows, cols, merged_grid=g)
        return seq
