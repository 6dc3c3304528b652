"""The GeoPixel network: CLIP tower + InternLM2 + SAM-2, from pixels to grounded text and masks.

Inference follows the reference ``evaluate`` (ARCHITECTURE.md §0.1): the prompt is
``[BOS] + image tokens + chat template`` (§5.1), greedy decoding with a KV cache keeps only the
final-normed hidden states at the input positions of the generated ``[SEG]`` tokens (§8.1), which
``text_hidden_fcs`` projects into SAM-2 prompts on the image resized to 1024² (§8.2–8.5). Several
images are batched through CLIP, one left-padded LLM generation and one SAM-2 encoder pass.

Every call is :meth:`GeoPixel.run_prepared` of :meth:`GeoPixel.prepare`: the CPU half (loading,
HD division, normalization, SAM-2 resize; :mod:`geopixel.host`) can run on other threads
ahead of the device half.

The reference silently truncates prompts at ``max_length``; here an image whose crop grid would
not leave room for ``max_new_tokens`` is divided on a smaller grid (logged), and a prompt that
cannot fit even with one tile is refused with a ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from geopixel.checkpoint import load_checkpoint, resolve_checkpoint
from geopixel.config import GeoPixelConfig
from geopixel.generate import DecodeFn, compile_decode_step, generate
from geopixel.grounding import Grounding, MaskOutput
from geopixel.hd_divider import Grid
from geopixel.host import ImageInput, PreparedBatch, clip_crops, collect_result, fit_grid, load_image
from geopixel.llm import InternLM2
from geopixel.result import GeoPixelResult
from geopixel.tokenizer import GCG_QUERY, RRSIS_TEMPLATE, GeoPixelTokenizer
from geopixel.vision import VisionTower

CLIP_BATCH = 32  # crops per CLIP call: bounds activation memory for large batches of images
SAM_BATCH = 4  # images per SAM-2 encoder call


@dataclass
class Prompt:
    """The LLM input of one image (§5.1).

    Attributes:
        embeds: (L, C) ``[BOS] + image + text`` embeddings in the model dtype.
        im_mask: (L,) bool, true on the image positions.
        layout: Token id per position, ``-1`` at image positions (the golden ``input_ids_layout``).
        grid: The crop grid the image was divided on.
    """

    embeds: Tensor
    im_mask: Tensor
    layout: list[int]
    grid: Grid


class GeoPixel(nn.Module):
    """GeoPixel: grounded descriptions and referring segmentation of one or more images.

    Args:
        config: Model sizes and special token ids.
        tokenizer: The tokenizer (needed by :meth:`describe` / :meth:`segment`, not to build or
            load weights).
    """

    def __init__(self, config: GeoPixelConfig, *, tokenizer: GeoPixelTokenizer | None = None) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.vision = VisionTower.from_config(config)
        self.llm = InternLM2(config.llm)
        self.grounding = Grounding(config.grounding, hidden_size=config.llm.hidden_size)
        self._decode_fn: DecodeFn | None = None  # None: eager decode step (see compile_decode)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> GeoPixel:
        """Load a released checkpoint (directory or hub id) without allocating weights twice.

        Args:
            path_or_id: Checkpoint directory (``config.json``, weights, ``tokenizer.model``; the
                golden ``reference-tiny`` folder works too) or a hub id such as
                ``MBZUAI/GeoPixel-7B`` (fetched only when online).
            device: ``cuda``, ``cpu``, ``mps``; None picks the best available.
            dtype: ``bf16``, ``fp16``, ``fp32`` or a torch dtype; None = bf16 on accelerators,
                fp32 on cpu.

        Returns:
            The model in eval mode on ``device``.
        """
        root = resolve_checkpoint(path_or_id)
        config = GeoPixelConfig.from_dir(root)
        tokenizer = GeoPixelTokenizer.from_dir(root)
        with torch.device("meta"):  # no weight memory until the checkpoint tensors are assigned
            model = cls(config, tokenizer=tokenizer)
        load_checkpoint(model, root, device=device, dtype=dtype)
        return model

    def compile_decode(
        self, *, mode: str | None = "reduce-overhead", backend: str = "inductor", fullgraph: bool = True
    ) -> GeoPixel:
        """Run the decode step through ``torch.compile`` from now on (opt-in; returns ``self``).

        With the default ``mode="reduce-overhead"`` on CUDA each decode step replays a captured
        CUDA graph, removing the per-kernel launch cost that dominates batch-1 decoding of a 7B
        model (gpt-fast's main lever). It is opt-in because it is unmeasured here (no GPU was lent
        to the task that wrote it, see docs/PERFORMANCE.md), compiling takes tens of seconds per new
        (batch, cache length) shape, and on CPU it brings nothing. Tokens and [SEG] hidden states
        equal the eager path's (tested with the ``eager``/``aot_eager`` backends on CPU).

        Args:
            mode: Inductor mode; ``"reduce-overhead"`` = CUDA graphs.
            backend: ``"inductor"``, or ``"eager"``/``"aot_eager"`` to check the traced graph.
            fullgraph: Fail on graph breaks.

        Returns:
            This model.
        """
        self._decode_fn = compile_decode_step(mode=mode, backend=backend, fullgraph=fullgraph)
        return self

    def free_caches(self) -> None:
        """Free the LLM's KV caches.

        Caches are kept between calls so that consecutive batches of the same size and length
        reuse them (no reallocation, the same CUDA graph); a 7B cache for one 800 px tile and a
        1,024-token answer holds about 0.7 GB per row in bf16 until this is called or a call
        with another batch size or length replaces it.
        """
        self.llm.clear_caches()

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.llm.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the weights."""
        return self.llm.norm.weight.dtype

    # ---- public API -------------------------------------------------------------------------

    def describe(
        self,
        image: ImageInput,
        prompt: str | None = None,
        *,
        hd_num: int = 9,
        max_new_tokens: int = 1024,
        temperature: float = 0.0,
        stream: Callable[[str], None] | None = None,
    ) -> GeoPixelResult:
        """Grounded description of one image (the GCG task).

        Args:
            image: (H, W, 3) uint8 RGB array, PIL image or path (converted to RGB).
            prompt: The question; None uses the GCG query of the reference docs.
            hd_num: Crop budget of the divider (9 as in the reference).
            max_new_tokens: Generation limit (1024 as in the reference ``evaluate``).
            temperature: 0 = greedy (the reference); > 0 samples.
            stream: Called with each new piece of the answer text as it is generated.

        Returns:
            Text, phrases, one mask per ``[SEG]`` at the image size, scores, token ids.
        """
        return self._run([image], [self.describe_query(prompt)], hd_num=hd_num, max_new_tokens=max_new_tokens,
                         temperature=temperature, stream=stream)[0]

    def segment(
        self, image: ImageInput, expression: str, *, hd_num: int = 9, max_new_tokens: int = 64
    ) -> GeoPixelResult:
        """Referring segmentation: ask for the mask of ``expression`` (the RRSIS task).

        Args:
            image: (H, W, 3) uint8 RGB array, PIL image or path.
            expression: The referring expression, e.g. ``"the red car"``.
            hd_num: Crop budget of the divider.
            max_new_tokens: Generation limit (the RES answer is ~9 tokens).

        Returns:
            The result; ``masks[0]`` is the mask of the first ``[SEG]`` (none if none was produced).
        """
        return self.segment_batch([image], expression, hd_num=hd_num, max_new_tokens=max_new_tokens)[0]

    def describe_batch(
        self,
        images: Sequence[ImageInput],
        *,
        prompt: str | None = None,
        hd_num: int = 9,
        max_new_tokens: int = 1024,
        temperature: float = 0.0,
        keep_mask_logits: bool = False,
    ) -> list[GeoPixelResult]:
        """:meth:`describe` for several images in one batch (CLIP, LLM and SAM-2 batched).

        Args:
            images: Images as in :meth:`describe`.
            prompt: The question for every image; None uses the GCG query.
            hd_num: Crop budget.
            max_new_tokens: Generation limit.
            temperature: 0 = greedy.
            keep_mask_logits: Also return the full-size mask logits (``mask_logits``, float16,
                (N, H, W)): a per-pixel confidence, at 2 bytes a pixel per mask of host copy.

        Returns:
            One result per image, in order.
        """
        queries = [self.describe_query(prompt)] * len(images)
        return self._run(
            images, queries, hd_num=hd_num, max_new_tokens=max_new_tokens, temperature=temperature,
            keep_mask_logits=keep_mask_logits,
        )

    def segment_batch(
        self,
        images: Sequence[ImageInput],
        expression: str | Sequence[str],
        *,
        hd_num: int = 9,
        max_new_tokens: int = 64,
        keep_mask_logits: bool = False,
    ) -> list[GeoPixelResult]:
        """:meth:`segment` for several images (one expression for all, or one per image).

        Args:
            images: Images as in :meth:`describe`.
            expression: Referring expression(s).
            hd_num: Crop budget.
            max_new_tokens: Generation limit.
            keep_mask_logits: Also return the mask logits (float16), as in :meth:`describe_batch`.

        Returns:
            One result per image, in order.
        """
        exprs = [expression] * len(images) if isinstance(expression, str) else list(expression)
        if len(exprs) != len(images):
            raise ValueError(f"{len(exprs)} expressions for {len(images)} images")
        queries = [self.segment_query(e) for e in exprs]
        return self._run(
            images, queries, hd_num=hd_num, max_new_tokens=max_new_tokens, keep_mask_logits=keep_mask_logits
        )

    # ---- stages -----------------------------------------------------------------------------

    def prepare(
        self,
        images: Sequence[ImageInput],
        queries: str | Sequence[str],
        *,
        hd_num: int = 9,
        max_new_tokens: int = 1024,
    ) -> PreparedBatch:
        """The CPU half of a call: load, tokenize, divide and normalize, touching no accelerator.

        Builds each image's CLIP crops (HD divide, normalization, bicubic global view) and its
        SAM-2 1024² input, in the model dtype on the CPU. Thread-safe: run it on worker threads
        for the next batch while the device runs :meth:`run_prepared` on the current one.
        ``describe_batch(images, ...)`` is ``run_prepared(prepare(images, describe_query(prompt)))``.

        Args:
            images: Images as in :meth:`describe`.
            queries: The full question for every image, or one per image (see
                :meth:`describe_query`, :meth:`segment_query`).
            hd_num: Crop budget.
            max_new_tokens: Generation limit (also the room kept free in the context).

        Returns:
            The prepared batch (join several with :meth:`PreparedBatch.join` or pass a list to
            :meth:`run_prepared`).

        Raises:
            ValueError: Bad image arrays, a query count that does not match, or a prompt that
                cannot fit the context even on one tile.
        """
        return self._prepare(images, queries, hd_num=hd_num, max_new_tokens=max_new_tokens, sam=True)

    @torch.inference_mode()
    def run_prepared(
        self,
        prepared: PreparedBatch | Sequence[PreparedBatch],
        *,
        temperature: float = 0.0,
        stream: Callable[[str], None] | None = None,
        forced_token_ids: Tensor | None = None,
        keep_mask_logits: bool = False,
    ) -> list[GeoPixelResult]:
        """The device half of a call: CLIP, generation with the KV cache, SAM-2 masks.

        Args:
            prepared: Output of :meth:`prepare`, or several (run as one batch, in order).
            temperature: 0 = greedy.
            stream: Called with each new piece of the first image's answer text.
            forced_token_ids: Teacher forcing (B, max_new_tokens) (scoring, parity tests).
            keep_mask_logits: Also return the float16 mask logits (see :meth:`describe_batch`).

        Returns:
            One result per image, in order.
        """
        batch = prepared if isinstance(prepared, PreparedBatch) else PreparedBatch.join(prepared)
        if not len(batch):
            return []
        prompts = self.embed_prompts(batch)
        out = generate(
            self.llm,
            None,
            [p.embeds for p in prompts],
            [p.im_mask for p in prompts],
            max_new_tokens=batch.max_new_tokens,
            seg_id=self.config.seg_token_id,
            eos_id=self.config.llm.eos_token_id,
            temperature=temperature,
            stream_callback=self._streamer(stream),
            forced_token_ids=forced_token_ids,
            decode_fn=self._decode_fn,
        )
        masks = self.ground(batch, out.seg_hidden)
        tok, keep = self._tok(), keep_mask_logits
        return [
            collect_result(out, b, masks[b], tokenizer=tok, hw=batch.images[b].shape[:2], keep_logits=keep)
            for b in range(len(batch))
        ]

    def _run(
        self,
        images: Sequence[ImageInput],
        queries: Sequence[str],
        *,
        hd_num: int,
        max_new_tokens: int,
        temperature: float = 0.0,
        stream: Callable[[str], None] | None = None,
        forced_token_ids: Tensor | None = None,
        keep_mask_logits: bool = False,
    ) -> list[GeoPixelResult]:
        """``run_prepared(prepare(...))``: the one code path of every public call."""
        if not images:
            return []
        prepared = self.prepare(images, queries, hd_num=hd_num, max_new_tokens=max_new_tokens)
        return self.run_prepared(
            prepared,
            temperature=temperature,
            stream=stream,
            forced_token_ids=forced_token_ids,
            keep_mask_logits=keep_mask_logits,
        )

    def build_prompts(
        self, images: Sequence[ImageInput], queries: Sequence[str], *, hd_num: int, max_new_tokens: int
    ) -> list[Prompt]:
        """Divide and embed the images (one CLIP batch) and wrap each in its chat prompt (§5.1).

        Args:
            images: Images as in :meth:`describe`.
            queries: One question per image.
            hd_num: Crop budget.
            max_new_tokens: Room to keep free in the context for the answer.

        Returns:
            One :class:`Prompt` per image.

        Raises:
            ValueError: A prompt cannot fit ``max_length`` even on a single tile.
        """
        prepared = self._prepare(images, queries, hd_num=hd_num, max_new_tokens=max_new_tokens, sam=False)
        return self.embed_prompts(prepared)

    def embed_prompts(self, prepared: PreparedBatch) -> list[Prompt]:
        """Embed prepared crops (CLIP, ``CLIP_BATCH`` crops per call) and text into chat prompts.

        Args:
            prepared: Output of :meth:`prepare`.

        Returns:
            One :class:`Prompt` per image, on the model's device.
        """
        tok = self._tok()
        grid_shapes = [(g.rows, g.cols) for g in prepared.grids]
        # CPU crops in the model dtype: the tower moves them one CLIP_BATCH chunk at a time.
        image_embeds = self.vision(torch.cat(prepared.crops), grid_shapes, batch_size=CLIP_BATCH)
        embed = self.llm.tok_embeddings
        out = []
        for img, ids, grid in zip(image_embeds, prepared.text_ids, prepared.grids, strict=True):
            bos = embed(torch.tensor([tok.bos_id], device=self.device))  # (1, C)
            text = embed(torch.tensor(ids, dtype=torch.long, device=self.device))  # (T, C)
            embeds = torch.cat([bos, img.to(bos.dtype), text])  # (1 + L_img + T, C)
            im_mask = torch.zeros(embeds.shape[0], dtype=torch.bool, device=self.device)
            im_mask[1 : 1 + img.shape[0]] = True
            out.append(Prompt(embeds, im_mask, [tok.bos_id] + [-1] * img.shape[0] + ids, grid))
        return out

    def ground(self, prepared: PreparedBatch, seg_hidden: Sequence[Tensor]) -> list[MaskOutput | None]:
        """SAM-2 masks for the ``[SEG]`` hidden states of each image (None where there are none).

        Only the images that have at least one ``[SEG]`` go through the SAM-2 encoder, batched
        ``SAM_BATCH`` at a time (each chunk moved to the device on its own).

        Args:
            prepared: The batch (its SAM-2 inputs; computed here when it has none).
            seg_hidden: Per image, (n_seg, C) final-normed hidden states.

        Returns:
            Per image, the selected masks at the original size, or None.
        """
        todo = [b for b, h in enumerate(seg_hidden) if h.shape[0] > 0]
        out: list[MaskOutput | None] = [None] * len(prepared)
        for start in range(0, len(todo), SAM_BATCH):
            chunk = todo[start : start + SAM_BATCH]
            if prepared.sam_pixels is not None:
                pixels = torch.stack([prepared.sam_pixels[b] for b in chunk])  # (n, 3, 1024, 1024)
            else:
                pixels = self.grounding.preprocess([prepared.images[b] for b in chunk]).to(self.dtype)
            features = self.grounding.encode_images(pixels.to(self.device))  # image_embed (n, d, 64, 64)
            for j, b in enumerate(chunk):
                prompts = self.grounding.project_seg(seg_hidden[b].to(self.dtype))  # (n_seg, out_dim)
                hw = prepared.images[b].shape[:2]
                out[b] = self.grounding.decode_masks(features, prompts, orig_hw=hw, index=j)
        return out

    @staticmethod
    def describe_query(prompt: str | None = None) -> str:
        """The question :meth:`describe` asks: ``prompt``, or the GCG query when None."""
        return prompt or GCG_QUERY

    @staticmethod
    def segment_query(expression: str) -> str:
        """The question :meth:`segment` asks for ``expression`` (the RRSIS template)."""
        return RRSIS_TEMPLATE.format(expression)

    def _prepare(
        self,
        images: Sequence[ImageInput],
        queries: str | Sequence[str],
        *,
        hd_num: int,
        max_new_tokens: int,
        sam: bool,
    ) -> PreparedBatch:
        arrays = [load_image(im) for im in images]
        qs = [queries] * len(arrays) if isinstance(queries, str) else list(queries)
        if len(qs) != len(arrays):
            raise ValueError(f"{len(qs)} queries for {len(arrays)} images")
        tok, dtype, tile = self._tok(), self.dtype, self.config.vision.image_size
        text_ids = [tok.inference_prompt_ids(q) for q in qs]
        reserved = [len(ids) + 1 + max_new_tokens for ids in text_ids]  # BOS + question + answer
        grids = [self._fit_grid(a, hd_num, n) for a, n in zip(arrays, reserved, strict=True)]
        crops = [clip_crops(a, g, tile=tile, dtype=dtype) for a, g in zip(arrays, grids, strict=True)]
        pixels = [self.grounding.preprocess([a])[0].to(dtype) for a in arrays] if sam else None
        return PreparedBatch(arrays, text_ids, grids, crops, pixels, max_new_tokens)

    # ---- helpers ----------------------------------------------------------------------------

    def _tok(self) -> GeoPixelTokenizer:
        if self.tokenizer is None:
            raise RuntimeError("this GeoPixel has no tokenizer: use from_pretrained or pass tokenizer=")
        return self.tokenizer

    def _fit_grid(self, image: np.ndarray, hd_num: int, reserved: int) -> Grid:
        """The reference's crop grid, or the largest smaller one whose prompt fits (see :func:`fit_grid`)."""
        return fit_grid(image, hd_num, reserved=reserved, config=self.config)

    def _streamer(self, stream: Callable[[str], None] | None) -> Callable[[list[int]], None] | None:
        if stream is None:
            return None
        tok, ids, sent = self._tok(), [], [""]

        def on_tokens(step_tokens: list[int]) -> None:
            ids.append(step_tokens[0])
            text = tok.response_text(ids)
            if text.startswith(sent[0]) and len(text) > len(sent[0]):
                stream(text[len(sent[0]) :])
                sent[0] = text

        return on_tokens
