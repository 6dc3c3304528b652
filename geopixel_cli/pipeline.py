"""Scene -> tiles -> batches -> model -> pieces -> seam merge -> layers, with threads and resume.

Reader threads read and stretch tiles ahead of the model (each thread owns a dataset handle) and,
when the model has ``prepare``/``run_prepared`` (``geopixel.GeoPixel``), also do its CPU work
(HD division, normalization, SAM-2 resize; a few tens of MB a tile in the model dtype); the
calling thread batches tiles and runs the model; a writer thread vectorizes each batch and
appends it to the journal. Peak memory is set by the batch size and the read-ahead, not by the
scene. When every tile is done the pieces are merged across seams and the layers are written
atomically; ``--resume`` reuses the journal's finished tiles and gives the same layers.
"""

from __future__ import annotations

import inspect
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from geopixel_cli.errors import UserError
from geopixel_cli.journal import Journal, journal_path, piece_from_json, piece_to_json
from geopixel_cli.layers import (
    Georef,
    Staging,
    objects_frame,
    runs_frame,
    select_objects,
    tiles_frame,
    write_layers,
)
from geopixel_cli.loader import SceneModel, load_model
from geopixel_cli.merge import merge_pieces
from geopixel_cli.raster import SceneInfo, SceneReader, TileData, open_scene
from geopixel_cli.runconfig import RunConfig, RunSummary, validate
from geopixel_cli.tiling import TileSpec, grid
from geopixel_cli.vectorize import tile_pieces

log = logging.getLogger("geopixel_cli")
GDAL_CACHE_MB = 128  # block cache for the run; see run()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def resolve_batch_size(net: SceneModel, config: RunConfig) -> int:
    """``config.batch_size``, or when it is None the batch size that fits the model's free GPU memory.

    On CUDA the free memory (``torch.cuda.mem_get_info`` plus what torch's allocator holds unused)
    is shared out by :func:`geopixel.memory.auto_batch_size` for tiles of ``tile_size`` px at
    ``hd_num`` with ``max_new_tokens`` answers (at most 32). Anywhere else (CPU, MPS, a model
    double without a CUDA ``device``) batching gains little and the batch size is 1.

    Args:
        net: The loaded model.
        config: Run options.

    Returns:
        Tiles per model call.
    """
    if config.batch_size is not None:
        return config.batch_size
    device = getattr(net, "device", None)
    if getattr(device, "type", None) != "cuda" or not hasattr(net, "config"):
        return 1
    import torch
    from geopixel.memory import auto_batch_size, tile_prompt_tokens

    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    tokens, crops = tile_prompt_tokens(
        net.config, width=config.tile_size, height=config.tile_size, hd_num=config.hd_num
    )
    size = auto_batch_size(
        free_bytes=free,
        config=net.config,
        prompt_tokens=tokens,
        max_new_tokens=config.max_new_tokens,
        dtype=getattr(net, "dtype", torch.bfloat16),
        crops_per_image=crops,
    )
    log.info("batch size %d, chosen from %.1f GB of free GPU memory (--batch-size sets it)", size, free / 1e9)
    return size


def _accepts(method: Any, name: str) -> bool:
    """Whether ``method`` takes a keyword argument ``name`` (model doubles may not)."""
    try:
        return name in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


class PreparingModel(SceneModel, Protocol):
    """A :class:`~geopixel_cli.loader.SceneModel` that also splits a call in a CPU and a device half.

    ``geopixel.GeoPixel`` has these methods; the pipeline uses them when all are present.
    """

    def prepare(self, images: list[np.ndarray], queries: str, *, hd_num: int, max_new_tokens: int) -> Any:
        """CPU-only, thread-safe preparation of (H, W, 3) uint8 images for ``queries``."""
        ...

    def run_prepared(self, prepared: list[Any], *, keep_mask_logits: bool = False) -> list[Any]:
        """The device half for one or more prepared batches, one ``GeoPixelResult`` per image."""
        ...

    def describe_query(self, prompt: str | None = None) -> str:
        """The question ``describe_batch`` asks."""
        ...

    def segment_query(self, expression: str) -> str:
        """The question ``segment_batch`` asks for ``expression``."""
        ...


_PREPARING_METHODS = ("prepare", "run_prepared", "describe_query", "segment_query")


def _preparing(net: SceneModel) -> PreparingModel | None:
    return cast(PreparingModel, net) if all(hasattr(net, m) for m in _PREPARING_METHODS) else None


def tile_preparer(net: SceneModel, config: RunConfig) -> Callable[[np.ndarray], Any] | None:
    """The model's CPU half for one tile's RGB, to run on the reader threads; None if it has none.

    ``geopixel.GeoPixel`` splits a call into ``prepare`` (load, HD divide, normalize, SAM-2
    resize: CPU only, thread-safe) and ``run_prepared`` (the device). Calling ``prepare`` where
    the tiles are read keeps that CPU work off the model's thread, so the device does not wait
    for it. Models without these methods (:class:`PreparingModel`; the ``SceneModel`` protocol
    only asks for ``describe_batch``/``segment_batch``) are called with the pixels.

    Args:
        net: The model.
        config: Run options.

    Returns:
        ``rgb (H, W, 3) uint8 -> prepared tile``, or None.
    """
    model = _preparing(net)
    if model is None:
        return None
    if config.command == "describe":
        query = model.describe_query(config.prompt)
    else:
        assert config.expression is not None
        query = model.segment_query(config.expression.strip())
    hd_num, budget = config.hd_num, config.max_new_tokens

    def prepare_tile(rgb: np.ndarray) -> Any:
        return model.prepare([rgb], query, hd_num=hd_num, max_new_tokens=budget)

    return prepare_tile


def _call_model(net: SceneModel, batch: list[tuple[TileSpec, TileData, Any]], config: RunConfig) -> list[Any]:
    """One batch through the model; mask logits are asked for when the model can return them.

    Tiles prepared on the reader threads go to ``run_prepared``; otherwise the pixels go to
    ``describe_batch``/``segment_batch``. The logits give every vectorized region its own score
    (mean probability inside it, see :func:`geopixel_cli.vectorize.tile_pieces`) instead of the
    whole mask's predicted IoU.
    """
    prepared = [p for _, _, p in batch]
    model = _preparing(net)
    if model is not None and all(p is not None for p in prepared):
        return model.run_prepared(prepared, keep_mask_logits=True)
    images = [d.rgb for _, d, _ in batch]
    method = net.describe_batch if config.command == "describe" else net.segment_batch
    extra = {"keep_mask_logits": True} if _accepts(method, "keep_mask_logits") else {}
    if config.command == "describe":
        return net.describe_batch(
            images, prompt=config.prompt, hd_num=config.hd_num, max_new_tokens=config.max_new_tokens, **extra
        )
    assert config.expression is not None
    return net.segment_batch(
        images, config.expression.strip(), hd_num=config.hd_num, max_new_tokens=config.max_new_tokens, **extra
    )


def tile_record(tile: TileSpec, data: TileData, result: Any | None, config: RunConfig) -> dict[str, Any]:
    """The journal record of one finished tile (``result`` None: skipped as mostly nodata)."""
    if result is None:
        return {
            "tile_id": tile.tile_id,
            "status": "skipped_nodata",
            "text": "",
            "caption": "",
            "n_phrases": 0,
            "pieces": [],
        }
    if result.masks.shape[1:] != data.valid.shape:
        raise RuntimeError(
            f"model returned masks of shape {result.masks.shape[1:]} for a {data.valid.shape} tile"
        )
    expression = config.expression.strip() if config.command == "segment" and config.expression else None
    pieces = tile_pieces(tile, result, data.valid, expression=expression, min_pixels=config.min_pixels)
    return {
        "tile_id": tile.tile_id,
        "status": "done",
        "text": result.text,
        "caption": result.caption,
        "n_phrases": len(result.phrases),
        "pieces": [piece_to_json(p) for p in pieces],
    }


def _read_ahead(
    todo: list[TileSpec],
    info: SceneInfo,
    config: RunConfig,
    prepare: Callable[[np.ndarray], Any] | None = None,
) -> Iterator[tuple[TileSpec, TileData, Any]]:
    """Tiles with their pixels, in order, read by a thread pool a bounded number of tiles ahead.

    With ``prepare`` (see :func:`tile_preparer`), each tile that will reach the model (valid
    fraction at least ``min_valid``) is also prepared on the reader thread; the third item is the
    prepared tile, else None.
    """
    local = threading.local()
    readers: list[SceneReader] = []

    def read(tile: TileSpec) -> tuple[TileData, Any]:
        if not hasattr(local, "reader"):
            local.reader = SceneReader(info)
            readers.append(local.reader)
        data = local.reader.read(tile.window)
        ready = prepare is not None and data.valid.mean() >= config.min_valid
        return data, prepare(data.rgb) if ready and prepare is not None else None

    lookahead = 2 * (config.batch_size or 1) + config.readers
    pending: deque[tuple[TileSpec, Future[tuple[TileData, Any]]]] = deque()
    tiles = iter(todo)
    with ThreadPoolExecutor(config.readers, thread_name_prefix="geopixel-read") as pool:
        try:
            for tile in tiles:
                pending.append((tile, pool.submit(read, tile)))
                if len(pending) >= lookahead:
                    break
            while pending:
                tile, future = pending.popleft()
                nxt = next(tiles, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(read, nxt)))
                data, prepared = future.result()
                yield tile, data, prepared
        finally:
            for _, future in pending:
                future.cancel()
    for reader in readers:
        reader.close()


class _Writer(threading.Thread):
    """Vectorizes finished batches and appends them to the journal, off the model's thread."""

    def __init__(self, journal: Journal, config: RunConfig, on_done: Any) -> None:
        super().__init__(name="geopixel-write", daemon=True)
        self.inbox: queue.Queue[list[tuple[TileSpec, TileData, Any]] | None] = queue.Queue(maxsize=2)
        self.records: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self._journal, self._config, self._on_done = journal, config, on_done

    def run(self) -> None:
        while (batch := self.inbox.get()) is not None:
            if self.error is not None:
                continue  # keep draining so the producer never blocks
            try:
                records = [tile_record(t, d, r, self._config) for t, d, r in batch]
                self._journal.append(records)
                self.records.extend(records)
                self._on_done(len(records))
            except BaseException as exc:  # re-raised on the main thread
                self.error = exc

    def put(self, batch: list[tuple[TileSpec, TileData, Any]]) -> None:
        if self.error is not None:
            raise self.error
        self.inbox.put(batch)


def process_tiles(
    todo: list[TileSpec], info: SceneInfo, net: SceneModel, journal: Journal, config: RunConfig, on_done: Any
) -> list[dict[str, Any]]:
    """Run the model over ``todo`` and journal every finished tile.

    Args:
        todo: Tiles still to do, in grid order.
        info: The scene.
        net: The model.
        journal: Open journal to append to.
        config: Run options.
        on_done: Called with the number of tiles finished (progress).

    Returns:
        The new tile records.
    """
    writer = _Writer(journal, config, on_done)
    writer.start()
    batch: list[tuple[TileSpec, TileData, Any]] = []
    try:
        for tile, data, prepared in _read_ahead(todo, info, config, tile_preparer(net, config)):
            if data.valid.mean() < config.min_valid:
                writer.put([(tile, data, None)])
                continue
            batch.append((tile, data, prepared))
            if len(batch) >= (config.batch_size or 1):
                results = _call_model(net, batch, config)
                writer.put([(t, d, r) for (t, d, _), r in zip(batch, results, strict=True)])
                batch = []
        if batch:
            results = _call_model(net, batch, config)
            writer.put([(t, d, r) for (t, d, _), r in zip(batch, results, strict=True)])
    finally:
        writer.inbox.put(None)
        writer.join()
    if writer.error is not None:
        raise writer.error
    return writer.records


def _progress(config: RunConfig, total: int, done: int) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not config.progress,
        transient=False,
    )
    progress.add_task(f"{config.command} tiles", total=total, completed=done)
    return progress


def _finish(
    records: dict[int, dict[str, Any]],
    tiles: list[TileSpec],
    info: SceneInfo,
    config: RunConfig,
    run: dict[str, Any],
) -> tuple[list[Path], int]:
    """Merge, filter and write every output; returns the files and the object count.

    Every output (layers, mask raster, preview) is staged first and renamed into place only when
    all are complete, the main output last: a failure leaves none of them.
    """
    from geopixel_cli.products import write_mask_raster, write_preview

    georef = Georef(info.crs_wkt, info.transform)
    ordered = [records[t.tile_id] for t in tiles]
    pieces = [piece_from_json(p) for r in ordered for p in r["pieces"]]
    kept = select_objects(
        merge_pieces(pieces, tiles),
        georef,
        simplify=config.simplify,
        min_area=config.min_area,
        min_score=config.min_score,
        top_k=config.top_k,
        by_score=config.command == "segment",
    )
    per_tile: dict[int, int] = {}
    for obj in kept:
        per_tile[obj.merged.tile_id] = per_tile.get(obj.merged.tile_id, 0) + 1
    tile_rows = [
        {
            **{k: r[k] for k in ("tile_id", "status", "caption", "n_phrases")},
            "row": t.row,
            "col": t.col,
            "x_off": t.window.col_off,
            "y_off": t.window.row_off,
            "width": t.window.width,
            "height": t.window.height,
            "n_objects": per_tile.get(t.tile_id, 0),
        }
        for t, r in zip(tiles, ordered, strict=True)
    ]
    run = {**run, "finished": _now(), "n_objects": len(kept)}
    frames = {
        "objects": objects_frame(kept, info.crs_wkt),
        "tiles": tiles_frame(tile_rows, georef),
        "runs": runs_frame(run),
    }
    with Staging(config.output) as staging:  # all outputs appear together, the main output last
        write_layers(config.output, frames, staging=staging)
        if config.mask_raster is not None:
            write_mask_raster(config.mask_raster, info, kept, staging=staging)
        if config.preview is not None:
            write_preview(config.preview, info, kept, staging=staging)
        files = staging.commit()
    return files, len(kept)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("geopixel")
    except PackageNotFoundError:
        return "unknown"


def run(config: RunConfig, *, model: SceneModel | None = None) -> RunSummary:
    """Run ``describe`` or ``segment`` over a whole scene and write its layers.

    GDAL's block cache is capped at ``GDAL_CACHE_MB`` for the run (unless the user set
    ``GDAL_CACHEMAX``): its default, 5 % of RAM, otherwise fills with decompressed blocks of a
    big scene and makes peak memory grow with the scene.

    Args:
        config: Run options.
        model: An already loaded model (tests, notebooks); None loads ``config.model``.

    Returns:
        What was written.

    Raises:
        UserError: Any bad input, output or model, before anything is written at the output path.
    """
    import rasterio

    options = {} if "GDAL_CACHEMAX" in os.environ else {"GDAL_CACHEMAX": GDAL_CACHE_MB * 2**20}  # bytes
    with rasterio.Env(**options):
        return _run(config, model)


def _run(config: RunConfig, model: SceneModel | None) -> RunSummary:
    started = time.perf_counter()
    validate(config)
    info = open_scene(config.scene, bidx=config.bidx)
    if info.crs_wkt is None:
        log.warning(
            "%s has no CRS: coordinates are in its geotransform's units (pixels when it has none), "
            "areas and perimeters are left empty",
            config.scene,
        )
    tiles = grid(info.width, info.height, tile_size=config.tile_size, overlap=config.overlap)
    journal = Journal(journal_path(config.output))
    header = {"options": config.tile_options(), "started": _now()}
    records: dict[int, dict[str, Any]] = {}
    resuming = config.resume and journal.path.exists()
    if resuming:  # checks the options before the (slow) model load, then appends
        old, previous = journal.resume(header)
        header["started"] = old.get("started", header["started"])
        records = {r["tile_id"]: r for r in previous}
        log.info("resuming: %d of %d tiles already done", len(records), len(tiles))
    elif config.resume:
        log.warning("nothing to resume for %s: starting from the first tile", config.output)
    todo = [t for t in tiles if t.tile_id not in records]
    try:
        net = (
            model
            if model is not None or not todo
            else load_model(config.model, device=config.device, dtype=config.dtype)
        )
        config = replace(config, batch_size=1 if net is None else resolve_batch_size(net, config))
    except BaseException:
        journal.close()
        raise
    if not resuming:
        journal.start(header)
    n_resumed = len(records)
    try:
        with _progress(config, len(tiles), len(records)) as progress:
            task = progress.task_ids[0]
            if todo:
                assert net is not None
                new = process_tiles(todo, info, net, journal, config, lambda n: progress.advance(task, n))
                records.update({r["tile_id"]: r for r in new})
    except KeyboardInterrupt:
        journal.close()
        raise UserError(
            f"interrupted; finished tiles are kept, rerun with --resume to continue ({config.output})"
        ) from None
    except BaseException:
        journal.close()
        log.warning("finished tiles are kept: rerun with --resume to continue")
        raise
    run_row = {
        "command": config.command,
        "scene": config.scene,
        "model": config.model,
        "version": _version(),
        "options": {
            **config.tile_options(),
            "min_area": config.min_area,
            "simplify": config.simplify,
            "min_score": config.min_score,
            "top_k": config.top_k,
        },
        "started": header["started"],
        "n_tiles": len(tiles),
        "n_skipped": sum(r["status"] != "done" for r in records.values()),
    }
    try:
        files, n_objects = _finish(records, tiles, info, config, run_row)
    except BaseException:
        journal.close()
        log.warning("finished tiles are kept: rerun with --resume to write the outputs")
        raise
    journal.remove()
    return RunSummary(
        files=files,
        n_tiles=len(tiles),
        n_skipped=run_row["n_skipped"],
        n_resumed=n_resumed,
        n_objects=n_objects,
        seconds=time.perf_counter() - started,
    )
