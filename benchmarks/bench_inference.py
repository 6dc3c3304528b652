"""Inference speed of the GeoPixel network with random weights at the real 7B dimensions.

Prints decode tokens/s at batch 1, 4 and 16 (eager and ``torch.compile``d decode step, the same
``geopixel.generate.compile_decode_step`` that ``GeoPixel.compile_decode`` uses), prefill time of a
4,081-image-token prompt, CLIP over 10 crops, SAM-2 encoder + decoder, end-to-end
``describe_batch`` tiles/s with fixed-length answers at batch 1 and at the batch size
``geopixel.memory.auto_batch_size`` picks from free GPU memory (eager and compiled decode), the
same-sized LlamaForCausalLM through transformers' generic ``generate`` as a baseline ratio, peak
GPU memory, and the physical limits (``limit_*``) for the ``--bandwidth``/``--flops`` given
(default: H100 SXM, 3.35 TB/s and 989 TFLOP/s bf16 dense).

No checkpoint is needed: the model is built on the meta device, materialised on the target device
and filled with small random values (speed does not depend on the values; the answer length is fixed
by suppressing EOS).

    python benchmarks/bench_inference.py --preset geopixel-7b --device cuda --dtype bf16
    python benchmarks/bench_inference.py --preset tiny --device cpu --dtype fp32 --quick   # smoke run

The tokenizer comes from ``--tokenizer`` (default ../shared/reference/tokenizer/tokenizer.model).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from geopixel import GeoPixel, GeoPixelConfig
from geopixel.checkpoint import materialize_buffers, parse_dtype
from geopixel.generate import compile_decode_step, decode_one_token, prefill, setup_caches
from geopixel.memory import auto_batch_size, limits, tile_prompt_tokens
from geopixel.tokenizer import GeoPixelTokenizer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = ROOT.parent / "shared" / "reference" / "tokenizer" / "tokenizer.model"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, *, repeat: int = 3, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def random_model(
    cfg: GeoPixelConfig, tokenizer: GeoPixelTokenizer, device: torch.device, dtype: torch.dtype
) -> GeoPixel:
    """Build on meta, materialise on ``device`` and fill with N(0, 0.02) (norm weights 1)."""
    with torch.device("meta"):
        model = GeoPixel(cfg, tokenizer=tokenizer)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "layer_norm" in name or "layrnorm" in name):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for b in model.buffers():
            if b.is_floating_point() and not b.is_meta:
                b.normal_(0.0, 1.0, generator=gen)
    materialize_buffers(model, device=device)
    return model.to(dtype).eval()


def bench_decode(model: GeoPixel, *, batch: int, prompt_len: int, steps: int, compiled: bool) -> float:
    """Tokens/s of the decode step at ``batch`` rows after a ``prompt_len`` prefill."""
    llm, dev, dt = model.llm, model.device, model.dtype
    width = model.config.llm.hidden_size
    setup_caches(llm, batch=batch, max_len=prompt_len + steps + 1, dtype=dt, device=dev, static=compiled)
    x = torch.randn(batch, prompt_len, width, device=dev, dtype=dt) * 0.02
    with torch.no_grad():
        prefill(llm, x, im_mask=None, pad=None)
    step = compile_decode_step() if compiled else decode_one_token
    pad = torch.zeros(batch, dtype=torch.long, device=dev)
    tok = torch.ones(batch, 1, dtype=torch.long, device=dev)

    def run() -> None:
        pos = torch.tensor([prompt_len], device=dev)
        with torch.no_grad():
            for _ in range(steps):
                if compiled:
                    torch.compiler.cudagraph_mark_step_begin()
                _, logits = step(llm, llm.tok_embeddings(tok), input_pos=pos, pad=pad)
                tok.copy_(logits.argmax(-1, keepdim=True))
                pos += 1

    seconds = timed(run, dev, repeat=3, warmup=2 if compiled else 1)
    return batch * steps / seconds


def bench_prefill(model: GeoPixel, *, n_image: int, n_text: int) -> float:
    """Milliseconds to prefill one prompt of ``n_image`` image tokens + ``n_text`` text tokens."""
    llm, dev, dt = model.llm, model.device, model.dtype
    total = n_image + n_text
    setup_caches(llm, batch=1, max_len=total + 8, dtype=dt, device=dev)
    x = torch.randn(1, total, model.config.llm.hidden_size, device=dev, dtype=dt) * 0.02
    im = torch.zeros(1, total, dtype=torch.bool, device=dev)
    im[:, 1 : 1 + n_image] = True

    def run() -> None:
        with torch.no_grad():
            prefill(llm, x, im_mask=im, pad=None)

    return 1000 * timed(run, dev)


def bench_clip(model: GeoPixel, *, crops: int) -> float:
    """Milliseconds for CLIP + merge + projector over ``crops`` 560² crops (one 3×3 image)."""
    dev, dt = model.device, model.dtype
    side = model.config.vision.image_size
    pixels = torch.randn(crops, 3, side, side, device=dev, dtype=dt)
    rows = int(round((crops - 1) ** 0.5))

    def run() -> None:
        with torch.no_grad():
            model.vision(pixels, [(rows, (crops - 1) // rows)])

    return 1000 * timed(run, dev)


def bench_sam(model: GeoPixel, *, n_seg: int) -> tuple[float, float]:
    """Milliseconds for the SAM-2 encoder on one 1024² image and the decoder for ``n_seg`` prompts."""
    dev = model.device
    image = np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8)
    g = model.grounding
    pixels = g.preprocess([image], device=dev).to(model.dtype)
    feats = g.encode_images(pixels)
    prompts = torch.randn(n_seg, model.config.grounding.out_dim, device=dev, dtype=model.dtype)

    def enc() -> None:
        with torch.no_grad():
            g.encode_images(pixels)

    def dec() -> None:
        with torch.no_grad():
            g.decode_masks(feats, prompts, orig_hw=(800, 800))

    return 1000 * timed(enc, dev), 1000 * timed(dec, dev)


def bench_describe(
    model: GeoPixel, *, batch: int, tiles: int, tile: int, new_tokens: int, hd_num: int
) -> float:
    """Tiles/s of ``describe_batch`` on random ``tile``² tiles with answers of exactly ``new_tokens``.

    One untimed batch first (CUDA/cuBLAS start-up, cache allocation, compilation of the decode
    step for this batch shape when ``model.compile_decode()`` was called).
    """
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (tile, tile, 3), dtype=np.uint8) for _ in range(tiles)]
    # Random weights almost never emit EOS; keep the length fixed regardless.
    eos = model.config.llm.eos_token_id
    with torch.no_grad():
        model.llm.output.weight[eos].fill_(-1.0)
    model.describe_batch(images[:batch], hd_num=hd_num, max_new_tokens=new_tokens)
    sync(model.device)
    start = time.perf_counter()
    for i in range(0, tiles, batch):
        model.describe_batch(images[i : i + batch], hd_num=hd_num, max_new_tokens=new_tokens)
    sync(model.device)
    return tiles / (time.perf_counter() - start)


def free_memory(device: torch.device) -> int:
    """Free device bytes, counting what torch's caching allocator holds unused (as the CLI does)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def describe_rows(
    model: GeoPixel, out: dict[str, object], *, quick: bool, compile_too: bool, new_tokens: int
) -> None:
    """``describe_batch`` tiles/s at batch 1 and at the batch size chosen from free memory."""
    dev, tile, hd_num = model.device, 800, 9
    model.free_caches()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        tokens, crops = tile_prompt_tokens(model.config, width=tile, height=tile, hd_num=hd_num)
        free = free_memory(dev)
        auto = auto_batch_size(
            free_bytes=free,
            config=model.config,
            prompt_tokens=tokens,
            max_new_tokens=new_tokens,
            dtype=model.dtype,
            crops_per_image=crops,
        )
        out["free_gib_before_describe"], out["auto_batch_size"] = free / 2**30, auto
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        auto = 2  # CPU smoke run: just exercise batching
    kw = {"tile": tile, "new_tokens": new_tokens, "hd_num": hd_num}
    out[f"describe_tiles_s_b1_{new_tokens}tok"] = bench_describe(
        model, batch=1, tiles=2 if quick else 8, **kw
    )
    model.free_caches()
    tiles = 2 * auto  # two timed batches of the same shape after the warm-up batch
    out[f"describe_tiles_s_b{auto}_{new_tokens}tok"] = bench_describe(model, batch=auto, tiles=tiles, **kw)
    if compile_too:
        model.free_caches()
        model.compile_decode()
        out[f"describe_tiles_s_b{auto}_{new_tokens}tok_compiled"] = bench_describe(
            model, batch=auto, tiles=tiles, **kw
        )
    if dev.type == "cuda":
        out["peak_gpu_gib_describe"] = torch.cuda.max_memory_allocated(dev) / 2**30
    model.free_caches()


def bench_baseline(
    cfg: GeoPixelConfig, device: torch.device, dtype: torch.dtype, *, prompt_len: int, steps: int
) -> float:
    """Decode tokens/s of a same-sized LlamaForCausalLM through transformers' generic ``generate``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = cfg.llm
    lcfg = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=False,
    )
    with torch.device(device):
        llama = LlamaForCausalLM(lcfg).to(dtype).eval()
    ids = torch.randint(3, 1000, (1, prompt_len), device=device)

    def gen(n: int) -> Callable[[], object]:
        return lambda: llama.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    full = timed(gen(steps), device, repeat=2)
    first = timed(gen(1), device, repeat=2)
    return (steps - 1) / max(full - first, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="geopixel-7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--quick", action="store_true", help="small counts (smoke run)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--bandwidth", type=float, default=3.35e12, help="B/s for the limit_* rows")
    parser.add_argument("--flops", type=float, default=989e12, help="FLOP/s for the limit_* rows")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype, device)
    cfg = GeoPixelConfig.from_name(args.preset)
    tok = GeoPixelTokenizer.from_file(args.tokenizer)
    model = random_model(cfg, tok, device, dtype)
    steps = 16 if args.quick else 128
    n_image = 4081  # one 800 px tile at hd_num 9 (3×3 crops + global view)
    prompt_len = n_image + 40
    out: dict[str, object] = {"preset": args.preset, "device": str(device), "dtype": str(dtype)}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        torch.cuda.reset_peak_memory_stats(device)

    for batch in (1, 4) if args.quick else (1, 4, 16):
        out[f"decode_tok_s_b{batch}_eager"] = bench_decode(
            model, batch=batch, prompt_len=prompt_len, steps=steps, compiled=False
        )
        if not args.no_compile:
            out[f"decode_tok_s_b{batch}_compiled"] = bench_decode(
                model, batch=batch, prompt_len=prompt_len, steps=steps, compiled=True
            )
        print(json.dumps({k: v for k, v in out.items() if f"b{batch}_" in k}), flush=True)
    model.llm.clear_caches()
    out["prefill_ms_4081_image_tokens"] = bench_prefill(model, n_image=n_image, n_text=40)
    out["clip_ms_10_crops"] = bench_clip(model, crops=10)
    enc_ms, dec_ms = bench_sam(model, n_seg=8)
    out["sam2_encoder_ms"], out["sam2_decoder_ms_8_prompts"] = enc_ms, dec_ms
    if device.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    new_tokens = 32 if args.quick else 300
    describe_rows(model, out, quick=args.quick, compile_too=not args.no_compile, new_tokens=new_tokens)
    batches = (1, 4) if args.quick else (1, 4, 16)
    bound = limits(
        cfg.llm,
        bandwidth=args.bandwidth,
        flops=args.flops,
        context=prompt_len + steps // 2,
        batches=batches,
        prompt_tokens=prompt_len,
        image_tokens=n_image,
        dtype=dtype,
    )
    out["limit_assumes"] = f"{args.bandwidth / 1e12:g} TB/s, {args.flops / 1e12:g} TFLOP/s ({dtype})"
    out.update({f"limit_{k}": v for k, v in bound.items()})
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    base = bench_baseline(cfg, device, dtype, prompt_len=prompt_len, steps=steps)
    out["baseline_hf_llama_generate_tok_s_b1"] = base
    out["ratio_ours_eager_vs_baseline_b1"] = float(out["decode_tok_s_b1_eager"]) / base  # type: ignore[arg-type]
    if "decode_tok_s_b1_compiled" in out:
        out["ratio_ours_compiled_vs_baseline_b1"] = float(out["decode_tok_s_b1_compiled"]) / base  # type: ignore[arg-type]
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
