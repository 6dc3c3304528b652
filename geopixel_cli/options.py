"""Option definitions shared by the commands (rio's names and behaviour where rio has one).

Defaults and why:

* ``--tile-size 800``: the released models were trained on 800 x 800 px iSAID patches, so an
  800 px tile shows objects at the scale the model learnt.
* ``--hd-num 9``: training saw each 800 px patch through a 3 x 3 grid of 560 px crops plus a
  global view (4,081 image tokens); 9 reproduces that view. Lower values are faster and
  coarser (``--hd-num 4``: 2 x 2 crops).
* ``--overlap 100``: gives the model context around every seam (12.5 % of a tile; 31 % more
  tiles than no overlap). Objects longer than the overlap are still joined by the seam merge,
  so the overlap does not need to hold whole objects.
* ``--batch-size`` (automatic): on CUDA, ``geopixel.memory.auto_batch_size`` shares the free
  GPU memory out per tile (KV cache of prompt + answer, prefill activations, CLIP crops, SAM-2
  encoder, plus a 10 % + 2 GiB margin), capped at 32: about 20 tiles of 800 px on an 80 GB card
  with 1,024-token answers. Bigger batches read the 15 GB of LLM weights once per decode step for
  more tiles. On CPU batching gains little, so the default is 1.
* ``--min-valid 0.1``: a tile with less than 10 % valid pixels is skipped (a full model call
  for a sliver of image); its few valid pixels are mostly covered by a neighbour's overlap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from geopixel_cli.loader import MODEL_ENV

Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        envvar=MODEL_ENV,
        show_envvar=True,
        help="Model directory or hub id (default: the released model for the command).",
    ),
]
Device = Annotated[
    str | None, typer.Option(help="Torch device: cuda, cuda:1, cpu, mps (default: automatic).")
]
Dtype = Annotated[str | None, typer.Option(help="Weights dtype: bf16, fp16 or fp32 (default: automatic).")]
Bidx = Annotated[
    str | None,
    typer.Option(
        "-b",
        "--bidx",
        help="Bands to use as RGB, 1-based, e.g. 3,2,1 or "
        "1 (repeated). (default: 1,2,3; band 1 for 1-2 band scenes)",
    ),
]
TileSize = Annotated[int, typer.Option(help="Tile size in pixels; 800 = the training patch size.")]
Overlap = Annotated[
    int,
    typer.Option(
        help="Overlap between tiles in pixels (context at seams; objects crossing seams are merged anyway)."
    ),
]
HdNum = Annotated[int, typer.Option(help="Max 560 px crops per tile; 9 = the 3x3 view used in training.")]
BatchSize = Annotated[
    int | None,
    typer.Option(
        help="Tiles per model call (default: on CUDA, as many as fit the GPU memory left free after "
        "loading the model, at most 32, counting KV cache, prefill, CLIP and SAM-2 memory per tile; "
        "1 on CPU/MPS)."
    ),
]
MinArea = Annotated[float, typer.Option(help="Drop objects smaller than this, in m² (pixels² without CRS).")]
Simplify = Annotated[float, typer.Option(help="Simplify outlines with this tolerance in map units (0: off).")]
MinValid = Annotated[float, typer.Option(help="Skip tiles whose valid (non-nodata) fraction is below this.")]
MaskRaster = Annotated[
    Path | None, typer.Option(help="Also write an instance-id COG (.tif): pixel = object_id, 0 = none.")
]
Preview = Annotated[Path | None, typer.Option(help="Also write a PNG quicklook with masks and labels.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]
Resume = Annotated[
    bool,
    typer.Option("--resume", help="Continue an interrupted run from its last finished tile (same options)."),
]
Verbose = Annotated[
    int, typer.Option("-v", "--verbose", count=True, help="More log output; -v also shows tracebacks.")
]
Quiet = Annotated[int, typer.Option("-q", "--quiet", count=True, help="Less log output, no progress bar.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
