"""Starting from base weights (IXC-2.5 directory + SAM-2 .pt), built here from the tiny golden checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from geopixel.checkpoint import CheckpointError
from safetensors.torch import load_file, save_file

from geopixel_cli.train.base_weights import load_base_model

GOLDEN = (Path(__file__).resolve().parents[2] / ".." / "shared" / "golden" / "reference-tiny").resolve()
BASE_VOCAB = 92544


def _split_golden(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    if not (GOLDEN / "model.safetensors").is_file():
        pytest.fail(f"golden tiny checkpoint missing at {GOLDEN}", pytrace=False)
    full = load_file(GOLDEN / "model.safetensors")
    ixc = tmp_path / "ixc"
    ixc.mkdir()
    base = {
        k: v for k, v in full.items() if not k.startswith(("model.visual_model.", "model.text_hidden_fcs."))
    }
    for key in ("model.tok_embeddings.weight", "output.weight"):
        base[key] = base[key][:BASE_VOCAB].clone()
    save_file(base, str(ixc / "model.safetensors"))
    cfg = json.loads((GOLDEN / "config.json").read_text())
    cfg.update(vocab_size=BASE_VOCAB, architectures=["InternLMXComposer2ForCausalLM"])
    cfg.pop("out_dim")
    (ixc / "config.json").write_text(json.dumps(cfg))
    dims = json.loads((GOLDEN / "tiny_dims.json").read_text())
    (ixc / "tiny_dims.json").write_text(json.dumps(dims))
    shutil.copy(GOLDEN / "tokenizer.model", ixc / "tokenizer.model")
    sam = {
        k.removeprefix("model.visual_model."): v
        for k, v in full.items()
        if k.startswith("model.visual_model.")
    }
    torch.save({"model": sam}, tmp_path / "sam2_tiny.pt")
    return ixc, tmp_path / "sam2_tiny.pt", full


def test_base_weights_load_resize_and_fresh_projection(tmp_path):
    ixc, sam2, full = _split_golden(tmp_path)
    model = load_base_model(ixc, sam2, device=torch.device("cpu"), dtype="fp32", seed=0)
    emb = model.llm.tok_embeddings.weight.detach()
    assert emb.shape[0] == 92553 and model.config.seg_token_id == 92550
    assert torch.equal(emb[:BASE_VOCAB], full["model.tok_embeddings.weight"][:BASE_VOCAB])
    assert 0.005 < float(emb[BASE_VOCAB:].std()) < 0.05  # new rows ~ N(0, 0.02)
    dec = model.grounding.mask_decoder.iou_token.weight
    assert torch.equal(dec, full["model.visual_model.sam_mask_decoder.iou_token.weight"])
    fcs = model.grounding.text_hidden_fcs[0][0].weight
    assert not torch.allclose(fcs, full["model.text_hidden_fcs.0.0.weight"])  # fresh init
    assert model.tokenizer.encode("<p> a </p> [SEG]", add_bos=False)[-1] == 92550


def test_base_weights_mismatch_is_listed(tmp_path):
    ixc, _, full = _split_golden(tmp_path)
    sam = {
        k.removeprefix("model.visual_model."): v
        for k, v in full.items()
        if k.startswith("model.visual_model.")
    }
    sam.pop("sam_mask_decoder.iou_token.weight")
    torch.save({"model": sam}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="iou_token"):
        load_base_model(ixc, tmp_path / "broken.pt", device=torch.device("cpu"), dtype="fp32")
