"""Training loop on the tiny golden checkpoint + synthetic data: resume, export, DDP, CLI errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from geopixel.training import LossWeights
from safetensors.torch import load_file
from typer.testing import CliRunner

from geopixel_cli.train.loop import TrainConfig, train
from geopixel_cli.train.synthetic import write_dataset

GOLDEN = (Path(__file__).resolve().parents[2] / ".." / "shared" / "golden" / "reference-tiny").resolve()


@pytest.fixture(scope="module")
def tiny_model() -> str:
    if not (GOLDEN / "model.safetensors").is_file():
        pytest.fail(f"golden tiny checkpoint missing at {GOLDEN}", pytrace=False)
    return str(GOLDEN)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_dataset(tmp_path_factory.mktemp("synth"), n=4, seed=3, size=96, object_scale=2.0)


def _cfg(data: Path, model: str, out: Path, **kw) -> TrainConfig:
    base = dict(
        task="rrsis",
        max_steps=3,
        lr=1e-3,
        save_every=1,
        progress=False,
        cache_sam_features=True,
        warmup_steps=1,
        export=False,
    )
    base.update(kw)
    return TrainConfig(data=data, model=model, output=out, **base)


def test_resume_gives_the_same_loss_curve(synth, tiny_model, tmp_path):
    import shutil

    full = train(_cfg(synth["rrsis"], tiny_model, tmp_path / "full", export=True))
    cut = train(_cfg(synth["rrsis"], tiny_model, tmp_path / "cut", stop_after=2))
    assert cut.steps == 2 and cut.export_dir is None
    # killed after logging step 2 but before its checkpoint landed: resume from step 1
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000002")
    with pytest.raises(FileExistsError, match="--resume"):
        train(_cfg(synth["rrsis"], tiny_model, tmp_path / "cut"))
    resumed = train(
        _cfg(synth["rrsis"], tiny_model, tmp_path / "cut", resume=True, workers=1)
    )  # same batches
    keys = ("loss", "ce", "bce", "dice", "lr", "grad_norm")
    assert [[r[k] for k in keys] for r in resumed.history] == [[r[k] for k in keys] for r in full.history[1:]]
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    with pytest.raises(ValueError, match="settings differ.*lr"):
        train(_cfg(synth["rrsis"], tiny_model, tmp_path / "cut", resume=True, lr=5e-4, max_steps=4))
    with pytest.raises(ValueError, match="settings differ.*loss_weights"):
        train(_cfg(synth["rrsis"], tiny_model, tmp_path / "cut", resume=True, weights=LossWeights(ce=0.5)))


def test_gradient_checkpointing_gives_the_same_gradients(synth, tiny_model, tmp_path):
    from geopixel.training import training_forward

    from geopixel_cli.train.collate import collate, make_example
    from geopixel_cli.train.loop import load_model
    from geopixel_cli.train.records import load_sample, read_json_list

    model = load_model(_cfg(synth["rrsis"], tiny_model, tmp_path), torch.device("cpu"))
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():  # non-zero LoRA B so that the adapters matter
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.01)
    rec = read_json_list(synth["rrsis"])[0]
    batch = collate(
        [make_example(load_sample(rec), tokenizer=model.tokenizer, config=model.config, hd_num=1)]
    )
    model.train()
    grads = []
    for ckpt in (False, True):
        model.llm.gradient_checkpointing = ckpt
        model.zero_grad()
        training_forward(model, batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(".lora_A." in k for k in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_export_is_a_loadable_released_checkpoint(synth, tiny_model, tmp_path):
    from geopixel.modeling import GeoPixel

    summary = train(_cfg(synth["rrsis"], tiny_model, tmp_path / "run", max_steps=2, export=True))
    final = summary.export_dir
    assert final is not None and (final / "config.json").is_file() and (final / "tokenizer.model").is_file()
    written = load_file(final / "model.safetensors")
    source = load_file(GOLDEN / "model.safetensors")
    assert set(written) == set(source)  # released key names, unused adapters carried over
    key = "model.layers.0.attention.wqkv.weight"
    assert not torch.equal(written[key], source[key])  # LoRA merged into the main weight
    assert torch.equal(written["model.norm.weight"], source["model.norm.weight"])  # frozen
    assert torch.equal(
        written["vit.vision_tower.vision_model.post_layernorm.weight"],
        source["vit.vision_tower.vision_model.post_layernorm.weight"],
    )
    model = GeoPixel.from_pretrained(final, device="cpu", dtype="fp32")
    torch.testing.assert_close(model.llm.layers[0].attention.wqkv.weight, written[key])


def test_tensorboard_events_match_metrics_jsonl(synth, tiny_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = train(_cfg(synth["rrsis"], tiny_model, tmp_path / "run", max_steps=2, tensorboard=True))
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows == summary.history
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/ce", "train/bce", "train/dice", "train/lr", "train/grad_norm"} <= set(
        events.Tags()["scalars"]
    )
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [1, 2]
    assert [e.value for e in logged] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def test_tensorboard_missing_is_one_clear_error(synth, tiny_model, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    with pytest.raises(ImportError, match="pip install tensorboard"):
        train(_cfg(synth["rrsis"], tiny_model, tmp_path / "run", max_steps=1, tensorboard=True))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


DDP_SCRIPT = """
import sys, json, torch
from pathlib import Path
from geopixel.training import LossWeights

from geopixel_cli.train.loop import TrainConfig, train
torch.set_num_threads(1)
data, model, out = sys.argv[1:4]
s = train(TrainConfig(data=Path(data), model=model, output=Path(out), task="rrsis", max_steps=2, lr=1e-3,
                      save_every=10, progress=False, cache_sam_features=True, export=False))
rank = int(__import__("os").environ["RANK"])
Path(out, f"rank{rank}.json").write_text(json.dumps(s.history))
"""


def test_ddp_two_cpu_processes(synth, tiny_model, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        str(script),
        str(synth["rrsis"]),
        tiny_model,
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    h0 = json.loads((out / "rank0.json").read_text())
    h1 = json.loads((out / "rank1.json").read_text())
    drop = [{k: v for k, v in r.items() if k != "seconds"} for r in h0]
    assert drop == [{k: v for k, v in r.items() if k != "seconds"} for r in h1]  # all-reduced metrics
    assert h0[-1]["samples"] == 4  # 2 steps x 2 ranks x batch 1
    saved = load_file(out / "checkpoints" / "step-0000002" / "trainable.safetensors")
    assert any(".lora_B." in k for k in saved)


def test_cli_reports_bad_data_and_bad_model(synth, tiny_model, tmp_path):
    from geopixel_cli.cli import app

    runner = CliRunner()
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            [
                {
                    "conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "[SEG]"}],
                    "image": "missing.png",
                    "segmentation": [],
                }
            ]
        )
    )
    res = runner.invoke(app, ["train", "--data", str(bad), "--model", tiny_model, "-o", str(tmp_path / "o1")])
    assert res.exit_code == 1 and "bad.json[0]: image not found" in res.output
    (tmp_path / "empty.txt").write_text("\n")
    res = runner.invoke(
        app,
        ["train", "--data", str(tmp_path / "empty.txt"), "--model", tiny_model, "-o", str(tmp_path / "o2")],
    )
    assert res.exit_code == 1 and "empty mixture" in res.output
    wrong = tmp_path / "wrong_model"
    wrong.mkdir()
    cfg = json.loads((GOLDEN / "config.json").read_text())
    cfg["hidden_size"] = 64
    (wrong / "config.json").write_text(json.dumps(cfg))
    (wrong / "model.safetensors").symlink_to(GOLDEN / "model.safetensors")
    (wrong / "tokenizer.model").symlink_to(GOLDEN / "tokenizer.model")
    res = runner.invoke(
        app, ["train", "--data", str(synth["rrsis"]), "--model", str(wrong), "-o", str(tmp_path / "o3")]
    )
    assert res.exit_code == 1 and "wrong_model" in res.output and "does not match" in res.output
    res = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(synth["rrsis"]),
            "--model",
            tiny_model,
            "-o",
            str(tmp_path / "o4"),
            "--ce-weight",
            "-1",
        ],
    )
    assert res.exit_code == 1 and "must not be negative" in res.output


def test_loss_falls_and_mask_iou_rises(tiny_model, tmp_path):
    from geopixel.modeling import GeoPixel

    from geopixel_cli.train.evaluate import evaluate_masks
    from geopixel_cli.train.loop import load_model
    from geopixel_cli.train.records import read_json_list

    data = write_dataset(tmp_path / "d", n=2, seed=11, size=96, object_scale=2.0)
    cfg = _cfg(
        data["rrsis"], tiny_model, tmp_path / "run", max_steps=20, lr=5e-3, save_every=100, export=True
    )
    records = read_json_list(data["rrsis"])
    before = evaluate_masks(load_model(cfg, torch.device("cpu")), records, hd_num=1)
    summary = train(cfg)
    after = evaluate_masks(
        GeoPixel.from_pretrained(summary.export_dir, device="cpu", dtype="fp32"), records, hd_num=1
    )
    losses = [r["loss"] for r in summary.history]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert after.ce < before.ce
    assert after.miou > before.miou + 0.2, (before.ious, after.ious)
