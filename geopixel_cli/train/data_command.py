"""``geopixel data``: prepare and check training data (registered by the CLI as a sub-app).

* ``convert-rrsisd ROOT -o OUT.json`` — native RRSIS-D → GeoPixel JSON list with COCO RLE masks;
* ``check DATA`` — read and validate a dataset / mixture exactly as training would;
* ``synth OUT --n N --seed S`` — synthetic GeoPixelD-format data for tests and demos.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(
    name="data", help="Prepare and check training data (GeoPixelD, RRSIS-D, synthetic).", no_args_is_help=True
)


def _guard(body: Callable[[], None]) -> None:
    from geopixel_cli.cli import guarded

    guarded(0, body)


@data_app.command("convert-rrsisd")
def convert_rrsisd_command(
    root: Annotated[Path, typer.Argument(help="RRSIS-D root holding rrsisd/refs(unc).p and images/.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="JSON list to write.")],
    *,
    split: Annotated[str, typer.Option(help="train, val or test.")] = "train",
    first_sentence: Annotated[
        bool, typer.Option("--first-sentence", help="One record per ref instead of one per sentence.")
    ] = False,
) -> None:
    """Convert native RRSIS-D to the GeoPixel fine-tuning format (one RLE per [SEG])."""

    def body() -> None:
        from geopixel_cli.train.rrsisd import convert_rrsisd

        n = convert_rrsisd(root, output, split=split, all_sentences=not first_sentence)
        typer.echo(f"{n} records -> {output}")

    _guard(body)


@data_app.command("check")
def check_command(
    data: Annotated[Path, typer.Argument(help="Mixture file, JSON list, RRSIS-D root or folder.")],
    *,
    seed: Annotated[int, typer.Option(help="Seed of the mixture sampling.")] = 0,
    decode: Annotated[bool, typer.Option("--decode", help="Also rasterise every mask (slower).")] = False,
) -> None:
    """Validate a dataset as training reads it; print the pool size per entry."""

    def body() -> None:
        from geopixel_cli.train.mixture import entries_for, load_entry
        from geopixel_cli.train.records import load_sample

        total = 0
        for entry in entries_for(data):
            records = load_entry(entry)
            n = entry.target_count(len(records))
            if decode:
                for rec in records:
                    load_sample(rec)
            total += n
            typer.echo(f"{entry.path}: {len(records)} records, {n} in the pool")
        typer.echo(f"pool: {total} samples")

    _guard(body)


@data_app.command("synth")
def synth_command(
    output: Annotated[Path, typer.Argument(help="Output folder.")],
    *,
    n: Annotated[int, typer.Option("--n", help="Number of scenes.")] = 32,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 512,
    object_scale: Annotated[float, typer.Option(help="Multiplier on object sizes.")] = 1.0,
) -> None:
    """Write synthetic GeoPixelD-format data (buildings, roads, bridges, storage tanks, ships)."""

    def body() -> None:
        from geopixel_cli.train.synthetic import write_dataset

        for kind, path in write_dataset(output, n=n, seed=seed, size=size, object_scale=object_scale).items():
            typer.echo(f"{kind}: {path}")

    _guard(body)
