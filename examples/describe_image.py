"""Describe one image with GeoPixel and save one PNG per grounded phrase.

Usage:
    python examples/describe_image.py IMAGE [--model DIR_OR_HUB_ID] [--prompt TEXT]
        [--segment EXPRESSION] [--hd-num 9] [--max-new-tokens 1024] [--device cuda] [--dtype bf16] [-o OUT]

`--model` defaults to MBZUAI/GeoPixel-7B (downloaded when online); the tiny golden fixture
(`../shared/golden/reference-tiny`) works too and runs on a CPU in seconds (random weights, so the
text is gibberish). With `--segment` it asks for the mask of a referring expression instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from geopixel import GeoPixel
from PIL import Image


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("image", type=Path, help="input image (any format PIL reads)")
    parser.add_argument("--model", default="MBZUAI/GeoPixel-7B", help="checkpoint directory or hub id")
    parser.add_argument("--prompt", default=None, help="question (default: the GCG description query)")
    parser.add_argument("--segment", default=None, help="referring expression: segment it instead")
    parser.add_argument("--hd-num", type=int, default=9, help="crop budget of the image divider")
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="generation limit")
    parser.add_argument("--device", default=None, help="cuda, cpu or mps (default: best available)")
    parser.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on GPU)")
    parser.add_argument("-o", "--out", type=Path, default=None, help="folder for mask PNGs")
    args = parser.parse_args()

    model = GeoPixel.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    if args.segment is not None:
        result = model.segment(
            args.image, args.segment, hd_num=args.hd_num, max_new_tokens=args.max_new_tokens
        )
        print(result.text)
    else:
        result = model.describe(
            args.image, args.prompt, hd_num=args.hd_num, max_new_tokens=args.max_new_tokens,
            stream=lambda piece: print(piece, end="", flush=True),
        )
        print()
    for phrase in result.phrases:
        area = int(result.masks[phrase.mask_index].sum()) if phrase.mask_index >= 0 else 0
        print(f"  {phrase.text!r}: mask {phrase.mask_index}, {area} px", file=sys.stderr)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for i, mask in enumerate(result.masks):
            Image.fromarray(mask.astype(np.uint8) * 255).save(args.out / f"mask_{i}.png")
        print(f"{len(result.masks)} masks written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
