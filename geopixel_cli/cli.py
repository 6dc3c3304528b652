"""``geopixel``: grounded descriptions and referring segmentation of scenes of any size, as GIS layers.

Each command turns its options into a :class:`~geopixel_cli.pipeline.RunConfig` and calls
:func:`~geopixel_cli.pipeline.run`. Torch and the network are imported only when a model is
loaded, so ``geopixel --help`` and ``geopixel info`` stay fast.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from geopixel_cli import options as opt
from geopixel_cli.errors import UserError
from geopixel_cli.train.data_command import data_app

app = typer.Typer(
    name="geopixel",
    help="Pixel-grounded descriptions and referring segmentation of geospatial scenes, written as "
    "vector layers (GeoPackage, GeoJSON, FlatGeobuf, GeoParquet, Shapefile).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Commands other modules provide: registered when their module imports, absent otherwise.
EXTRA_COMMANDS = (
    ("eval", "geopixel_cli.eval.command", "eval_command"),
    ("train", "geopixel_cli.train.command", "train_command"),
)


def configure_logging(verbose: int, quiet: int) -> int:
    """Log to stderr at WARNING - 10 x (verbose - quiet); returns the verbosity.

    Also silences rasterio's own GDAL messages and warnings below ``-vv``: the CLI reports
    problems itself, in one line.
    """
    verbosity = verbose - quiet
    level = max(logging.DEBUG, min(logging.CRITICAL, logging.WARNING - 10 * verbosity))
    logging.basicConfig(stream=sys.stderr, level=level, format="%(levelname)s: %(message)s", force=True)
    for noisy in ("rasterio", "pyogrio", "fiona"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbosity >= 2 else logging.CRITICAL)
    if verbosity < 2:
        warnings.filterwarnings("ignore", module="rasterio")
        warnings.filterwarnings("ignore", message=".*[Gg]eoreferenc.*")
    return verbosity


def guarded(verbosity: int, body: Callable[[], None]) -> None:
    """Run a command body; any failure becomes one line on stderr and exit code 1 (traceback with -v)."""
    try:
        body()
    except UserError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:
        if verbosity > 0:
            traceback.print_exc(file=sys.stderr)
        first = (str(exc).strip().splitlines() or [""])[0]
        hint = "" if verbosity > 0 else " (run with -v for the traceback)"
        typer.echo(f"Error: {type(exc).__name__}: {first}{hint}", err=True)
        raise typer.Exit(1) from None


def _batch_size(batch_size: int | None, device: str | None) -> int | None:
    """``--batch-size``; None (= chosen from free GPU memory after loading) unless the device is not CUDA."""
    if batch_size is not None:
        return batch_size
    if device is not None and not device.startswith("cuda"):
        return 1
    return None  # the pipeline decides once the model is loaded: from free memory on CUDA, else 1


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "expression"


def _run(config_kwargs: dict[str, Any], verbosity: int) -> None:
    from geopixel_cli.loader import resolve_model
    from geopixel_cli.pipeline import run
    from geopixel_cli.runconfig import RunConfig

    kwargs = dict(config_kwargs)
    kwargs["model"] = resolve_model(kwargs["model"], kwargs["command"])
    kwargs["batch_size"] = _batch_size(kwargs["batch_size"], kwargs["device"])
    summary = run(RunConfig(**kwargs, progress=verbosity >= 0))
    logging.getLogger("geopixel_cli").info(
        "%d objects from %d tiles (%d skipped as nodata, %d resumed) in %.1f s",
        summary.n_objects,
        summary.n_tiles,
        summary.n_skipped,
        summary.n_resumed,
        summary.seconds,
    )
    typer.echo(str(kwargs["output"]))


def _parse_bidx(bidx: str | None) -> tuple[int, ...] | None:
    from geopixel_cli.raster import parse_bidx

    return parse_bidx(bidx)


CLI_ONLY = ("verbose", "quiet")  # command parameters that are not RunConfig fields


def _config_kwargs(command: str, params: dict[str, Any], default_output: Path) -> dict[str, Any]:
    """RunConfig keyword arguments from a run command's parameters (named like RunConfig's fields).

    Args:
        command: ``"describe"`` or ``"segment"``.
        params: The command function's parameters (``locals()`` at its start).
        default_output: The output path when ``-o`` is not given.

    Returns:
        The keyword arguments, ``--bidx`` parsed (a bad value raises a UserError).
    """
    kwargs = {k: v for k, v in params.items() if k not in CLI_ONLY}
    kwargs.update(
        command=command, output=params["output"] or default_output, bidx=_parse_bidx(params["bidx"])
    )
    return kwargs


@app.command()
def describe(
    scene: Annotated[str, typer.Argument(help="Input raster (anything GDAL opens).")],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o", "--output", help="Output vector file; format by extension (default: <scene>_describe.gpkg)."
        ),
    ] = None,
    *,
    prompt: Annotated[
        str | None,
        typer.Option(
            help="Instruction sent with each tile (default: the model's grounded-description prompt)."
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Generation limit per tile.")] = 1024,
    model: opt.Model = None,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    bidx: opt.Bidx = None,
    tile_size: opt.TileSize = 800,
    overlap: opt.Overlap = 100,
    hd_num: opt.HdNum = 9,
    batch_size: opt.BatchSize = None,
    min_area: opt.MinArea = 0.0,
    simplify: opt.Simplify = 0.0,
    min_valid: opt.MinValid = 0.1,
    mask_raster: opt.MaskRaster = None,
    preview: opt.Preview = None,
    overwrite: opt.Overwrite = False,
    resume: opt.Resume = False,
    verbose: opt.Verbose = 0,
    quiet: opt.Quiet = 0,
) -> None:
    """Describe every tile of a scene; each grounded phrase becomes polygons in the `objects` layer.

    Example: geopixel describe scene.tif -o scene.gpkg -b 3,2,1 --mask-raster ids.tif --preview quick.png
    """
    params = dict(locals())  # first statement: exactly the command's parameters
    verbosity = configure_logging(verbose, quiet)
    default_out = Path(f"{Path(scene).stem}_describe.gpkg")
    guarded(verbosity, lambda: _run(_config_kwargs("describe", params, default_out), verbosity))


@app.command()
def segment(
    scene: Annotated[str, typer.Argument(help="Input raster (anything GDAL opens).")],
    expression: Annotated[str, typer.Argument(help='What to segment, e.g. "white storage tanks".')],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Output vector file; format by extension (default: <scene>_<expression>.gpkg).",
        ),
    ] = None,
    *,
    top_k: Annotated[int | None, typer.Option(help="Keep only the K best-scoring objects.")] = None,
    min_score: Annotated[float, typer.Option(help="Drop objects scoring below this (0-1).")] = 0.0,
    max_new_tokens: Annotated[int, typer.Option(help="Generation limit per tile.")] = 64,
    model: opt.Model = None,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    bidx: opt.Bidx = None,
    tile_size: opt.TileSize = 800,
    overlap: opt.Overlap = 100,
    hd_num: opt.HdNum = 9,
    batch_size: opt.BatchSize = None,
    min_area: opt.MinArea = 0.0,
    simplify: opt.Simplify = 0.0,
    min_valid: opt.MinValid = 0.1,
    mask_raster: opt.MaskRaster = None,
    preview: opt.Preview = None,
    overwrite: opt.Overwrite = False,
    resume: opt.Resume = False,
    verbose: opt.Verbose = 0,
    quiet: opt.Quiet = 0,
) -> None:
    """Segment what EXPRESSION refers to over the whole scene; one scored feature per object.

    The model answers in every tile, so a big scene can collect a false positive per tile:
    rank by the `score` field, or keep the best with --top-k / --min-score.

    Example: geopixel segment scene.tif "storage tanks near the harbor" --top-k 20
    """
    params = dict(locals())  # first statement: exactly the command's parameters
    verbosity = configure_logging(verbose, quiet)
    default_out = Path(f"{Path(scene).stem}_{_slug(expression)}.gpkg")
    guarded(verbosity, lambda: _run(_config_kwargs("segment", params, default_out), verbosity))


def _print_info(summary: dict[str, Any]) -> None:
    grid, work = summary["grid"], summary["work"]
    stretch = summary["stretch"]
    lines = [
        f"path:        {summary['path']}",
        f"size:        {summary['width']} x {summary['height']} px, {summary['count']} band(s), "
        f"{summary['dtype']}",
        f"bands used:  {','.join(map(str, summary['bands_used']))}",
        f"nodata:      {summary['nodata']}   valid pixels: {summary['valid_fraction']:.1%}",
        f"crs:         {summary['crs'] or 'none (pixel coordinates)'}"
        + (f"  ({summary['crs_name']})" if summary["crs_name"] else ""),
        f"pixel size:  {summary['pixel_size'][0]:g} x {summary['pixel_size'][1]:g} (CRS units)",
        "stretch:     "
        + (
            "none (uint8 used as is)"
            if stretch is None
            else f"low {[round(v, 2) for v in stretch['low']]} high {[round(v, 2) for v in stretch['high']]}"
        ),
        f"tile grid:   {grid['rows']} x {grid['cols']} = {grid['tiles']} tiles of {grid['tile_size']} px, "
        f"overlap {grid['overlap']} px",
        f"work:        up to {work['model_calls_max']} model calls at batch size {work['batch_size']} "
        f"(tiles under {work['min_valid']:.0%} valid are skipped: about {work['tiles_skipped_estimate']})",
    ]
    typer.echo("\n".join(lines))


@app.command()
def info(
    scene: Annotated[str, typer.Argument(help="Input raster (anything GDAL opens).")],
    *,
    bidx: opt.Bidx = None,
    tile_size: opt.TileSize = 800,
    overlap: opt.Overlap = 100,
    batch_size: Annotated[int, typer.Option(help="Tiles per model call (for the work estimate).")] = 1,
    min_valid: opt.MinValid = 0.1,
    as_json: opt.Json = False,
    verbose: opt.Verbose = 0,
    quiet: opt.Quiet = 0,
) -> None:
    """Size, CRS, bands, dtype, nodata, stretch and the tile grid of a scene, without loading the model.

    Example: geopixel info scene.tif --tile-size 800 --overlap 100
    """
    verbosity = configure_logging(verbose, quiet)

    def body() -> None:
        from geopixel_cli.info import scene_summary
        from geopixel_cli.raster import open_scene

        if tile_size < 32 or not 0 <= overlap <= tile_size // 2:
            raise UserError("need --tile-size >= 32 and 0 <= --overlap <= tile-size/2")
        summary = scene_summary(
            open_scene(scene, bidx=_parse_bidx(bidx)),
            tile_size=tile_size,
            overlap=overlap,
            batch_size=batch_size,
            min_valid=min_valid,
        )
        typer.echo(json.dumps(summary, indent=2)) if as_json else _print_info(summary)

    guarded(verbosity, body)


def _register_extra_commands(target: typer.Typer) -> None:
    """Add ``eval``/``train`` from their modules; a module that is not there leaves its command out."""
    for name, module_name, attr in EXTRA_COMMANDS:
        try:
            command = getattr(importlib.import_module(module_name), attr)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # the command's module is not part of this installation
            command = _unavailable(name, exc)
        except Exception as exc:  # a broken optional command must not break the others
            command = _unavailable(name, exc)
        target.command(name)(command)


def _unavailable(name: str, exc: BaseException) -> Callable[[], None]:
    """A stand-in command that reports why ``name`` could not be imported."""

    def command() -> None:
        typer.echo(f"Error: the {name} command is unavailable: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1)

    command.__doc__ = f"(unavailable: {type(exc).__name__}) Run `geopixel {name}` for the reason."
    return command


_register_extra_commands(app)
app.add_typer(data_app, name="data")


def main() -> None:
    """Console-script entry point."""
    app()
