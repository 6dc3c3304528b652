"""Training forward vs the reference golden (train_sample.*), and the loss functions on their own."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from geopixel.modeling import GeoPixel
from geopixel.training import dice_per_mask, mask_losses, shifted_ce, training_forward
from safetensors.torch import load_file

from geopixel_cli.train.collate import collate, make_example
from geopixel_cli.train.records import load_sample, read_json_list

TRAINABLE_LIKE_GOLDEN = (
    "llm.output.",
    "llm.tok_embeddings.",
    "grounding.mask_decoder.",
    "grounding.text_hidden_fcs.",
)


@pytest.fixture(scope="module")
def golden_forward(golden_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("gold") / "data"
    (data / "GeoPixelD" / "train").mkdir(parents=True)
    for ext in ("png", "json"):
        shutil.copy(golden_dir / "sample" / f"P0224_0_800_0_800.{ext}", data / "GeoPixelD" / "train")
    shutil.copy(golden_dir / "sample" / "GeoPixelD.json", data / "GeoPixelD.json")
    model = GeoPixel.from_pretrained(golden_dir, device="cpu", dtype="fp32")
    record = read_json_list(data / "GeoPixelD.json")[0]
    example = make_example(load_sample(record), tokenizer=model.tokenizer, config=model.config, hd_num=9)
    batch = collate([example])
    model.train()
    for module in model.modules():  # the golden forward ran with every dropout at p = 0
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for name, param in model.named_parameters():  # train.py's requires_grad (no PEFT in the golden)
        param.requires_grad_(name.startswith(TRAINABLE_LIKE_GOLDEN))
    out = training_forward(model, batch)
    out.loss.backward()
    ref = json.loads((golden_dir / "train_sample.json").read_text())
    tensors = load_file(golden_dir / "train_sample.safetensors")
    return model, batch, out, ref, tensors


def test_training_layout_and_labels(golden_forward):
    _, batch, out, ref, tensors = golden_forward
    assert batch.input_ids.shape[1] == ref["seq_len"]
    assert torch.equal(batch.input_ids[0], tensors["input_ids_layout"])
    assert torch.equal(batch.labels[0], tensors["labels"])
    assert torch.equal(batch.im_mask[0], tensors["im_mask"].bool())
    assert out.n_label_tokens == ref["num_label_tokens"]  # the first label is never supervised


def test_losses_equal_golden(golden_forward):
    _, _, out, ref, _ = golden_forward
    assert float(out.ce.detach()) == pytest.approx(ref["ce_loss_weighted"], rel=1e-5)
    assert float(out.bce.detach()) == pytest.approx(ref["mask_bce_loss_weighted"], rel=1e-5)
    assert float(out.dice.detach()) == pytest.approx(ref["mask_dice_loss_weighted"], rel=1e-5)
    assert float(out.bce_unweighted.detach()) == pytest.approx(ref["mask_bce_loss_unweighted"], rel=1e-5)
    assert float(out.dice_unweighted.detach()) == pytest.approx(ref["mask_dice_loss_unweighted"], rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(ref["total_loss"], rel=1e-5)


def test_seg_embeddings_and_low_res_masks(golden_forward):
    _, _, out, _, tensors = golden_forward
    torch.testing.assert_close(out.seg_embeddings.detach(), tensors["seg_embeddings"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.low_res_masks.detach(), tensors["low_res_masks"], atol=1e-3, rtol=1e-3)


def test_gradient_norms_equal_golden(golden_forward):
    model, _, _, ref, _ = golden_forward
    norms = ref["grad_norms"]
    fcs = model.grounding.text_hidden_fcs[0]
    for key, param in (
        ("0.0.weight", fcs[0].weight),
        ("0.0.bias", fcs[0].bias),
        ("0.2.weight", fcs[2].weight),
        ("0.2.bias", fcs[2].bias),
    ):
        assert float(param.grad.norm()) == pytest.approx(norms[f"text_hidden_fcs.{key}"], rel=1e-4)
    decoder = math.sqrt(
        sum(
            float(p.grad.norm()) ** 2 for p in model.grounding.mask_decoder.parameters() if p.grad is not None
        )
    )
    assert decoder == pytest.approx(norms["sam_mask_decoder.total"], rel=1e-4)
    assert float(model.llm.output.weight.grad.norm()) == pytest.approx(norms["output.weight"], rel=1e-4)
    assert float(model.llm.tok_embeddings.weight.grad.norm()) == pytest.approx(
        norms["tok_embeddings.weight"], rel=1e-4
    )
    # conv_s0 / conv_s1 run under no_grad, as in the reference: they never get gradients
    assert model.grounding.mask_decoder.conv_s0.weight.grad is None


def test_shifted_ce_equals_full_vocab_ce():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(2, 7, 8)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = -100
    labels[1, 5:] = -100
    ours, n = shifted_ce(hidden, labels, head)
    full = F.cross_entropy(
        head(hidden)[:, :-1].reshape(-1, 50).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(ours, full)


def test_dice_and_mask_loss_normalisation():
    logits = torch.tensor([[[10.0, -10.0], [-10.0, -10.0]]])  # (1, 2, 2): predicts one pixel
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert float(dice_per_mask(logits, target)[0]) == pytest.approx(0.0, abs=1e-3)
    empty = torch.full((1, 2, 2), -10.0)
    # 1 − (2Σpt + 0.001)/(Σp + Σt + 0.001) with the reference's 1/1000 scaling
    p = torch.sigmoid(empty).flatten()
    expect = 1 - (2 * (p * target.flatten()).sum() + 1e-3) / (p.sum() + target.sum() + 1e-3)
    assert float(dice_per_mask(empty, target)[0]) == pytest.approx(float(expect), rel=1e-4)
    # the batch mean is over masks, not samples
    preds = [torch.zeros(1, 2, 2), torch.zeros(3, 2, 2)]
    targets = [torch.ones(1, 2, 2), torch.zeros(3, 2, 2)]
    bce, _ = mask_losses(preds, targets)
    assert float(bce) == pytest.approx(math.log(2), rel=1e-6)
    bce0, dice0 = mask_losses([torch.zeros(0, 2, 2)], [torch.zeros(0, 2, 2)])
    assert float(bce0) == 0.0 and float(dice0) == 0.0
