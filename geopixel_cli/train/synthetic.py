"""Synthetic GeoPixelD-format data: aerial-looking scenes with buildings, roads, bridges, tanks, ships.

Each scene is drawn on textured ground (noise + low-frequency tint), optionally crossed by a river
that carries ships and a bridge. Every object is a polygon; the per-patch JSON stores, per grounded
phrase, the polygons of all instances of that class (a group mask, like GeoPixelD's group
annotations) plus every instance separately (``instances``). The caption interleaves
``<p> phrase </p> [SEG]`` in the order of the ``polygons`` list. Written files::

    OUT/train/<name>.png, OUT/train/<name>.json    image + per-patch annotation (DATASETS.md §1.3)
    OUT/GeoPixelD.json                             grounded-description list (polygons)
    OUT/rrsis.json                                 referring list, one class per record (COCO RLE)
    OUT/data.txt                                   mixture file using both lists once

Masks are defined as the reference rasterises the polygons (OpenCV ``fillPoly`` rule), so the
polygons and the loss targets agree exactly.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from geopixel_cli.train.rasterize import mask_to_rle, polygons_to_mask

CLASSES = ("building", "road", "bridge", "storage tank", "ship")
PLURAL = {
    "building": "buildings",
    "road": "roads",
    "bridge": "bridges",
    "storage tank": "storage tanks",
    "ship": "ships",
}
COLORS = {
    "building": [(178, 74, 60), (150, 150, 158), (200, 120, 80)],
    "road": [(70, 70, 74)],
    "bridge": [(196, 186, 160)],
    "storage tank": [(236, 236, 230)],
    "ship": [(250, 250, 250), (210, 60, 50)],
}
GCG_QUESTION = (
    "Could you perform an in-depth analysis of this photo, including interleaved segmentation masks "
    "to map each part of your answer to specific image object?"
)
RRSIS_QUESTION = "Could you provide a segmentation mask for {phrase} in this image?"
RRSIS_ANSWER = "Sure, it is [SEG]."


@dataclass
class Scene:
    """One generated scene: RGB image and per-class instance polygons."""

    image: np.ndarray
    instances: dict[str, list[list[list[int]]]] = field(default_factory=dict)


def _ground(rng: np.random.Generator, size: int) -> np.ndarray:
    base = np.array(rng.choice([[96, 124, 70], [140, 128, 96], [110, 112, 86]]), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phase = rng.uniform(0, 2 * math.pi, size=2)
    tint = 12 * np.sin(2 * math.pi * (xx * 1.3 + phase[0])) + 10 * np.cos(2 * math.pi * (yy * 0.9 + phase[1]))
    noise = rng.normal(0, 9, size=(size, size, 3)).astype(np.float32)
    img = base[None, None, :] + tint[..., None] + noise
    return np.clip(img, 0, 255).astype(np.uint8)


def _rect(cx: float, cy: float, w: float, h: float, angle: float) -> list[list[int]]:
    c, s = math.cos(angle), math.sin(angle)
    corners = [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
    return [[round(cx + x * c - y * s), round(cy + x * s + y * c)] for x, y in corners]


def _circle(cx: float, cy: float, r: float, n: int = 24) -> list[list[int]]:
    return [
        [round(cx + r * math.cos(2 * math.pi * k / n)), round(cy + r * math.sin(2 * math.pi * k / n))]
        for k in range(n)
    ]


def _ship(cx: float, cy: float, length: float, width: float, angle: float) -> list[list[int]]:
    c, s = math.cos(angle), math.sin(angle)
    shape = [
        (-length / 2, -width / 2),
        (length / 3, -width / 2),
        (length / 2, 0),
        (length / 3, width / 2),
        (-length / 2, width / 2),
    ]
    return [[round(cx + x * c - y * s), round(cy + x * s + y * c)] for x, y in shape]


def _clip(poly: list[list[int]], size: int) -> list[list[int]]:
    return [[min(max(x, 0), size - 1), min(max(y, 0), size - 1)] for x, y in poly]


def _free(occupied: np.ndarray, poly: list[list[int]], size: int) -> bool:
    mask = polygons_to_mask([poly], size, size)
    if (mask & occupied).any():
        return False
    occupied |= mask
    return True


def make_scene(rng: np.random.Generator, size: int = 512, *, object_scale: float = 1.0) -> Scene:
    """Draw one scene.

    Args:
        rng: Random generator.
        size: Square image side in pixels.
        object_scale: Multiplier on object sizes (1.0 = iSAID-like proportions at 512 px).

    Returns:
        The scene (image + instance polygons per class, only classes that were drawn).
    """
    image = Image.fromarray(_ground(rng, size))
    draw = ImageDraw.Draw(image)
    occupied = np.zeros((size, size), dtype=np.uint8)
    inst: dict[str, list[list[list[int]]]] = {}

    def add(cls: str, poly: list[list[int]], color: tuple[int, int, int], *, check: bool = True) -> None:
        poly = _clip(poly, size)
        if check and not _free(occupied, poly, size):
            return
        draw.polygon([tuple(p) for p in poly], fill=color)
        inst.setdefault(cls, []).append(poly)

    s = size / 512 * object_scale
    if rng.random() < 0.5:  # a river with a bridge and ships
        y0 = int(rng.uniform(0.3, 0.6) * size)
        river = [
            [0, y0],
            [size - 1, y0 + int(rng.uniform(-40, 40) * s)],
            [size - 1, y0 + int(90 * s)],
            [0, y0 + int(90 * s)],
        ]
        river = _clip(river, size)
        draw.polygon([tuple(p) for p in river], fill=(48, 84, 130))
        occupied |= polygons_to_mask([river], size, size)
        bx = rng.uniform(0.2, 0.8) * size
        add("bridge", _rect(bx, y0 + 45 * s, 26 * s, 150 * s, 0.0), COLORS["bridge"][0], check=False)
        for _ in range(int(rng.integers(1, 4))):
            sx = rng.uniform(0.05, 0.95) * size
            if abs(sx - bx) > 40 * s:
                ship = _ship(sx, y0 + rng.uniform(25, 65) * s, 44 * s, 14 * s, rng.uniform(-0.3, 0.3))
                add("ship", ship, COLORS["ship"][int(rng.integers(0, 2))], check=False)
    else:  # a road
        x0 = rng.uniform(0.2, 0.8) * size
        angle = rng.uniform(-0.4, 0.4) + math.pi / 2
        add("road", _rect(x0, size / 2, 2.2 * size, 34 * s, angle), COLORS["road"][0])
    for _ in range(int(rng.integers(2, 6))):
        cx, cy = rng.uniform(0.1, 0.9, size=2) * size
        w, h = rng.uniform(40, 90, size=2) * s
        palette = COLORS["building"]
        add(
            "building",
            _rect(cx, cy, w, h, rng.uniform(0, math.pi)),
            palette[int(rng.integers(0, len(palette)))],
        )
    if rng.random() < 0.6:
        cx, cy = rng.uniform(0.15, 0.85, size=2) * size
        for k in range(int(rng.integers(1, 4))):
            add(
                "storage tank",
                _circle(cx + k * 62 * s, cy, rng.uniform(20, 28) * s),
                COLORS["storage tank"][0],
            )
    return Scene(np.asarray(image), inst)


def phrase_for(cls: str, count: int) -> str:
    """Grounded phrase for ``count`` instances of a class (``a ship``, ``3 storage tanks``)."""
    if count == 1:
        return f"an {cls}" if cls[0] in "aeiou" else f"a {cls}"
    return f"{count} {PLURAL[cls]}"


def caption_for(scene: Scene, rng: random.Random) -> tuple[str, list[str]]:
    """GeoPixelD-style grounded description; returns the text and the classes in [SEG] order."""
    classes = [c for c in CLASSES if c in scene.instances]
    rng.shuffle(classes)
    parts = []
    for k, cls in enumerate(classes):
        lead = (
            "The aerial image shows"
            if k == 0
            else rng.choice(["Nearby there is", "It also contains", "There is also"])
        )
        parts.append(f"{lead} <p> {phrase_for(cls, len(scene.instances[cls]))} </p> [SEG] .")
    text = " ".join(parts) or "The aerial image shows open ground with no distinct objects."
    return text, classes


def write_dataset(
    out: Path, *, n: int, seed: int, size: int = 512, object_scale: float = 1.0
) -> dict[str, Path]:
    """Generate ``n`` scenes into ``out`` (layout in the module docstring).

    Args:
        out: Output folder (created).
        n: Number of scenes.
        seed: Random seed (same seed, same files).
        size: Image side in pixels.
        object_scale: Multiplier on object sizes.

    Returns:
        Paths of the written lists: ``gcg``, ``rrsis``, ``mixture``.
    """
    rng = np.random.default_rng(seed)
    text_rng = random.Random(seed)
    (out / "train").mkdir(parents=True, exist_ok=True)
    gcg, rrsis = [], []
    for i in range(n):
        scene = make_scene(rng, size, object_scale=object_scale)
        name = f"S{seed:04d}_{i:05d}"
        img_rel = f"train/{name}.png"
        Image.fromarray(scene.image).save(out / img_rel)
        text, classes = caption_for(scene, text_rng)
        polygons = [scene.instances[c] for c in classes]
        instances = [{"class": c, "polygon": p} for c in classes for p in scene.instances[c]]
        ann = {"id": i, "img": img_rel, "gcg_description": text, "polygons": polygons, "instances": instances}
        (out / "train" / f"{name}.json").write_text(json.dumps(ann))
        turns = [{"from": "human", "value": GCG_QUESTION}, {"from": "bot", "value": text}]
        gcg.append({"id": i, "conversations": turns, "image": img_rel, "polygons": f"train/{name}.json"})
        if classes:
            cls = text_rng.choice(classes)
            mask = polygons_to_mask(scene.instances[cls], size, size)
            phrase = f"the {PLURAL[cls]}" if len(scene.instances[cls]) > 1 else f"the {cls}"
            conv = [
                {"from": "human", "value": RRSIS_QUESTION.format(phrase=phrase)},
                {"from": "bot", "value": RRSIS_ANSWER},
            ]
            rrsis.append(
                {"id": i, "conversations": conv, "image": img_rel, "segmentation": [mask_to_rle(mask)]}
            )
    paths = {"gcg": out / "GeoPixelD.json", "rrsis": out / "rrsis.json", "mixture": out / "data.txt"}
    paths["gcg"].write_text(json.dumps(gcg, indent=1))
    paths["rrsis"].write_text(json.dumps(rrsis, indent=1))
    paths["mixture"].write_text("GeoPixelD.json x1\nrrsis.json x1\n")
    return paths
