"""Run options (what the CLI options become) and their validation before any work starts."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from geopixel_cli.errors import UserError
from geopixel_cli.journal import finished_tiles, journal_path
from geopixel_cli.layers import check_output, sidecars

# Options that decide what the model sees and how its masks become pieces: a resumed run must match.
TILE_OPTIONS = (
    "command",
    "scene",
    "model",
    "expression",
    "prompt",
    "bidx",
    "tile_size",
    "overlap",
    "hd_num",
    "max_new_tokens",
    "min_valid",
    "min_pixels",
)
log = logging.getLogger("geopixel_cli")


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``describe`` or ``segment`` run needs (what the CLI options become).

    Attributes:
        command: ``"describe"`` or ``"segment"``.
        scene: Input raster.
        output: Output vector file (format by extension).
        model: Model directory or hub id.
        expression: Referring expression (``segment`` only).
        prompt: Custom instruction for ``describe`` (None: the model's default).
        device: Torch device, or None for automatic.
        dtype: ``bf16``/``fp16``/``fp32``, or None for automatic.
        bidx: 1-based bands used as RGB, or None for the default.
        tile_size: Tile window, pixels.
        overlap: Overlap of neighbouring tiles, pixels.
        hd_num: Maximum number of 560 px crops the model cuts a tile into.
        batch_size: Tiles per model call; None chooses it from free GPU memory once the model is
            loaded (1 off CUDA), see :func:`geopixel_cli.pipeline.resolve_batch_size`.
        max_new_tokens: Generation limit per tile.
        min_area: Smallest object kept, m² (pixels² without a CRS).
        simplify: Simplification tolerance, map units (0: none).
        min_score: Lowest object score kept.
        top_k: Keep only the best ``top_k`` objects (None: all).
        min_valid: Tiles with a smaller fraction of valid (non-nodata) pixels are skipped.
        min_pixels: Mask regions smaller than this many pixels are noise.
        mask_raster: Optional instance-id COG path.
        preview: Optional PNG quicklook path.
        overwrite: Replace existing outputs.
        resume: Continue an interrupted run from its journal.
        readers: Reader threads.
        progress: Show a progress bar on stderr.
    """

    command: str
    scene: str
    output: Path
    model: str
    expression: str | None = None
    prompt: str | None = None
    device: str | None = None
    dtype: str | None = None
    bidx: tuple[int, ...] | None = None
    tile_size: int = 800
    overlap: int = 100
    hd_num: int = 9
    batch_size: int | None = 1
    max_new_tokens: int = 1024
    min_area: float = 0.0
    simplify: float = 0.0
    min_score: float = 0.0
    top_k: int | None = None
    min_valid: float = 0.1
    min_pixels: int = 4
    mask_raster: Path | None = None
    preview: Path | None = None
    overwrite: bool = False
    resume: bool = False
    readers: int = 2
    progress: bool = True

    def tile_options(self) -> dict[str, Any]:
        """The options a resumed run must share with the interrupted one (JSON-safe)."""
        values = asdict(self)
        values["scene"] = str(Path(self.scene).resolve()) if Path(self.scene).exists() else self.scene
        values["bidx"] = list(self.bidx) if self.bidx else None
        return {k: values[k] for k in TILE_OPTIONS}


@dataclass
class RunSummary:
    """What a finished run produced.

    Attributes:
        files: Files written, main output last among the vector files.
        n_tiles: Tiles in the grid.
        n_skipped: Tiles skipped as mostly nodata.
        n_resumed: Tiles taken from an interrupted run's journal.
        n_objects: Objects written.
        seconds: Wall time of this invocation.
    """

    files: list[Path] = field(default_factory=list)
    n_tiles: int = 0
    n_skipped: int = 0
    n_resumed: int = 0
    n_objects: int = 0
    seconds: float = 0.0


def validate(config: RunConfig) -> None:
    """Check options and outputs before anything is read or loaded.

    Also warns (one line) when an interrupted run's journal is there but ``--resume`` was not
    given: this run replaces it, so its finished tiles would be lost.

    Raises:
        UserError: On an empty expression, impossible grid options or a refused output.
    """
    if config.command == "segment" and not (config.expression or "").strip():
        raise UserError('the expression is empty; say what to segment, e.g. "white storage tanks"')
    if config.tile_size < 32 or not 0 <= config.overlap <= config.tile_size // 2:
        raise UserError(
            f"need --tile-size >= 32 and 0 <= --overlap <= tile-size/2 (got {config.tile_size}, "
            f"{config.overlap})"
        )
    batch = 1 if config.batch_size is None else config.batch_size  # None: chosen after loading
    if min(batch, config.hd_num, config.max_new_tokens) < 1:
        raise UserError("--batch-size, --hd-num and --max-new-tokens must be at least 1")
    if config.top_k is not None and config.top_k < 1:
        raise UserError("--top-k must be at least 1")
    check_output(config.output, overwrite=config.overwrite)
    for path in sidecars(config.output).values():
        if path.exists() and not config.overwrite:
            raise UserError(f"{path} already exists; pass --overwrite to replace it")
    for maybe, suffixes, option in (
        (config.mask_raster, (".tif", ".tiff"), "--mask-raster"),
        (config.preview, (".png",), "--preview"),
    ):
        if maybe is None:
            continue
        path = maybe
        if path.suffix.lower() not in suffixes:
            raise UserError(f"{option} must end with {' or '.join(suffixes)}, got {path.name}")
        if path.exists() and not config.overwrite:
            raise UserError(f"{path} already exists; pass --overwrite to replace it")
        if not path.parent.is_dir():
            raise UserError(f"output directory {path.parent} does not exist")
    stale = journal_path(config.output)
    if not config.resume and stale.exists():
        log.warning(
            "an interrupted run of %s left %d finished tiles in %s; starting over discards them "
            "(stop now and pass --resume to continue that run)",
            config.output,
            finished_tiles(stale),
            stale.name,
        )
