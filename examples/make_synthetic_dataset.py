"""Write a synthetic GeoPixelD-format dataset (buildings, roads, bridges, storage tanks, ships).

Usage: python examples/make_synthetic_dataset.py OUT --n N --seed S [--size 512] [--object-scale 1]

OUT gets train/*.png + per-patch polygon JSON, GeoPixelD.json (grounded descriptions),
rrsis.json (referring segmentation, COCO RLE) and data.txt; train on it with
`geopixel train --data OUT/data.txt --model tiny -o RUN`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from geopixel_cli.train.synthetic import write_dataset


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--n", type=int, default=32, help="number of scenes")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--object-scale", type=float, default=1.0, help="multiplier on object sizes")
    args = parser.parse_args()
    paths = write_dataset(args.out, n=args.n, seed=args.seed, size=args.size, object_scale=args.object_scale)
    for kind, path in paths.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
