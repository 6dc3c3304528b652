import json
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pyogrio
import pytest
from cli_scenes import Rect, make_scene
from typer.testing import CliRunner

from geopixel_cli import pipeline
from geopixel_cli.cli import app
from geopixel_cli.errors import UserError
from geopixel_cli.loader import check_model_dir, load_model, locate_model, resolve_model
from geopixel_cli.runconfig import RunSummary

TINY = Path(__file__).resolve().parents[2].parent / "shared" / "golden" / "reference-tiny"
runner = CliRunner()


def _invoke(args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


def test_help_lists_commands():
    result = _invoke(["--help"])
    assert result.exit_code == 0
    for name in ("describe", "segment", "info"):
        assert name in result.stdout


def test_segment_options_become_config(tmp_path, monkeypatch):
    scene = make_scene(tmp_path / "scene.tif")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GEOPIXEL_MODEL", raising=False)
    with patch.object(pipeline, "run", return_value=RunSummary(files=[Path("x")])) as fake:
        result = _invoke(
            [
                "segment",
                scene,
                "white storage tanks",
                "-b",
                "3,2,1",
                "--top-k",
                "5",
                "--tile-size",
                "640",
                "--overlap",
                "120",
                "--device",
                "cpu",
                "--min-area",
                "25",
                "-q",
            ]
        )
    assert result.exit_code == 0, result.output
    config = fake.call_args.args[0]
    assert config.command == "segment" and config.expression == "white storage tanks"
    assert (
        config.bidx == (3, 2, 1) and config.top_k == 5 and config.tile_size == 640 and config.overlap == 120
    )
    assert config.model == "MBZUAI/GeoPixel-7B-RES" and config.batch_size == 1 and config.min_area == 25
    assert config.output == Path("scene_white_storage_tanks.gpkg") and config.progress is False
    assert result.stdout.strip() == "scene_white_storage_tanks.gpkg"


def test_describe_defaults_and_env_model(tmp_path, monkeypatch):
    scene = make_scene(tmp_path / "scene.tif")
    monkeypatch.setenv("GEOPIXEL_MODEL", "/models/geopixel")
    with patch.object(pipeline, "run", return_value=RunSummary(files=[Path("x")])) as fake:
        result = _invoke(["describe", scene, "-o", tmp_path / "o.fgb", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    config = fake.call_args.args[0]
    assert (config.tile_size, config.overlap, config.hd_num, config.max_new_tokens) == (800, 100, 9, 1024)
    assert config.model == "/models/geopixel" and config.output == tmp_path / "o.fgb"


def test_info_json(tmp_path):
    scene = make_scene(tmp_path / "scene.tif", dtype="uint16", nodata=0, border=10)
    result = _invoke(["info", scene, "--json", "--tile-size", "200", "--overlap", "40"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["width"], info["height"], info["dtype"], info["crs"]) == (517, 433, "uint16", "EPSG:32633")
    assert info["grid"] == {"tile_size": 200, "overlap": 40, "rows": 3, "cols": 3, "tiles": 9}
    assert info["stretch"] is not None and info["nodata"] == 0
    assert info["work"]["tiles_skipped_estimate"] == 0
    import rasterio

    with rasterio.open(scene, "r+") as ds:  # the right 60 % becomes nodata: the last tile column is skipped
        data = ds.read()
        data[:, :, 200:] = 0
        ds.write(data)
    info = json.loads(_invoke(["info", scene, "--json", "--tile-size", "200", "--overlap", "40"]).stdout)
    assert info["work"]["tiles_skipped_estimate"] == 3 and info["work"]["model_calls_max"] == 6
    text = _invoke(["info", scene])
    assert text.exit_code == 0 and "1 x 1 = 1 tiles of 800 px" in text.stdout


def _bad_cases(tmp_path):
    scene = make_scene(tmp_path / "scene.tif", rects=(Rect(10, 10, 50, 50),))
    (tmp_path / "exists.gpkg").write_text("x")
    (tmp_path / "text.tif").write_text("not a raster")
    incomplete = tmp_path / "model_dir"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    out = tmp_path / "new.gpkg"
    return {
        "missing file": (["describe", tmp_path / "nope.tif", "-o", out], "scene not found"),
        "not a raster": (["describe", tmp_path / "text.tif", "-o", out], "cannot open"),
        "empty expression": (["segment", scene, "  ", "-o", out], "expression is empty"),
        "existing output": (["describe", scene, "-o", tmp_path / "exists.gpkg"], "already exists"),
        "missing directory": (["describe", scene, "-o", tmp_path / "no" / "o.gpkg"], "does not exist"),
        "bad format": (["describe", scene, "-o", tmp_path / "o.txt"], "unsupported output format"),
        "bad bidx": (["describe", scene, "-o", out, "-b", "1,2"], "--bidx"),
        "missing model": (
            ["describe", scene, "-o", out, "--model", tmp_path / "none"],
            "model directory not found",
        ),
        "incomplete model": (["describe", scene, "-o", out, "--model", incomplete], "incomplete"),
        "bad overlap": (["describe", scene, "-o", out, "--overlap", "500"], "--overlap"),
    }


def test_bad_input_one_line_nonzero_nothing_written(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, (args, expected) in _bad_cases(tmp_path).items():
        before = sorted(p.name for p in tmp_path.rglob("*"))
        result = _invoke(args)
        assert result.exit_code == 1, (name, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], (name, lines)
        assert "Traceback" not in result.output
        assert sorted(p.name for p in tmp_path.rglob("*")) == before, name


def test_unexpected_error_traceback_only_with_verbose(tmp_path):
    scene = make_scene(tmp_path / "scene.tif")
    with patch.object(pipeline, "run", side_effect=RuntimeError("boom\nsecond line")):
        quiet = _invoke(["describe", scene, "-o", tmp_path / "o.gpkg", "--device", "cpu"])
        loud = _invoke(["describe", scene, "-o", tmp_path / "o.gpkg", "--device", "cpu", "-v"])
    assert (
        quiet.exit_code == 1
        and quiet.stderr.strip() == "Error: RuntimeError: boom (run with -v for the traceback)"
    )
    assert loud.exit_code == 1 and "Traceback" in loud.stderr


def test_hub_id_offline_and_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert locate_model("MBZUAI/GeoPixel-7B") == "MBZUAI/GeoPixel-7B"  # resolved by geopixel.checkpoint
    hint = r"not in the local cache.*download MBZUAI/GeoPixel-7B --local-dir DIR` and pass `--model DIR`$"
    with pytest.raises(UserError, match=hint):
        load_model("MBZUAI/GeoPixel-7B", device="cpu", dtype="fp32")
    monkeypatch.delenv("GEOPIXEL_MODEL", raising=False)
    assert resolve_model(None, "describe") == "MBZUAI/GeoPixel-7B"
    assert resolve_model("/x", "segment") == "/x"


@pytest.mark.parametrize(
    "files,missing",
    [
        (("config.json", "tokenizer.model", "model.safetensors"), None),
        (("config.json", "tokenizer.model", "pytorch_model.bin"), None),
        (("config.json", "model.safetensors"), "missing tokenizer.model"),
        (("config.json", "tokenizer.model"), r"missing weights \(\*.safetensors or \*.bin\)"),
        (("tokenizer.model", "model.bin"), "missing config.json"),
    ],
)
def test_model_dir_check(tmp_path, files, missing):
    for name in files:
        (tmp_path / name).write_text("x")
    if missing is None:
        check_model_dir(tmp_path)
    else:
        with pytest.raises(UserError, match=missing):
            check_model_dir(tmp_path)


@pytest.mark.parametrize("command", ["describe", "segment"])
def test_end_to_end_with_tiny_checkpoint(tmp_path, monkeypatch, command):
    assert (TINY / "model.safetensors").exists(), f"golden checkpoint missing: {TINY} (needs ../shared)"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scene = make_scene(
        tmp_path / "scene.tif",
        width=500,
        height=420,
        dtype="uint16",
        nodata=0,
        border=8,
        rects=(Rect(250, 100, 330, 160),),
    )
    out = tmp_path / "out.gpkg"
    args = [command, scene] + (["red roofs"] if command == "segment" else [])
    args += [
        "-o",
        out,
        "--model",
        TINY,
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--tile-size",
        "300",
        "--overlap",
        "60",
        "--hd-num",
        "1",
        "--max-new-tokens",
        "6",
        "--batch-size",
        "2",
        "--mask-raster",
        tmp_path / "ids.tif",
        "-q",
    ]
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    layers = dict(pyogrio.list_layers(out).tolist())
    assert set(layers) == {"objects", "tiles", "runs"} and layers["objects"] == "MultiPolygon"
    tiles = pyogrio.read_dataframe(out, layer="tiles")
    assert len(tiles) == 4 and set(tiles["status"]) == {"done"}
    assert pyogrio.read_info(out, layer="objects")["crs"] == "EPSG:32633"
    objects = pyogrio.read_dataframe(out, layer="objects")
    assert list(objects.columns[:-1]) == [
        "object_id",
        "phrase",
        "category",
        "caption_id",
        "phrase_idx",
        "tile_id",
        "tile_ids",
        "score",
        "area_m2",
        "perimeter_m",
    ]
    assert (objects["area_m2"] > 0).all() and ((objects["score"] >= 0) & (objects["score"] <= 1)).all()
    runs = pyogrio.read_dataframe(out, layer="runs")
    assert runs.loc[0, "model"] == str(TINY) and json.loads(runs.loc[0, "options"])["hd_num"] == 1
    import rasterio

    with rasterio.open(tmp_path / "ids.tif") as ds:
        ids = ds.read(1)
    assert ids.shape == (420, 500) and set(np.unique(ids)) <= set([0, *objects["object_id"]])


def test_extra_commands_registered_absent_or_reported(monkeypatch):
    import sys
    import types

    import typer

    from geopixel_cli import cli

    good = types.ModuleType("fake_eval_cmd")

    def eval_command(x: int = 1) -> None:
        """Fake eval."""
        typer.echo(f"eval {x}")

    good.eval_command = eval_command
    monkeypatch.setitem(sys.modules, "fake_eval_cmd", good)
    broken = types.ModuleType("broken_cmd")  # exists but lacks the attribute
    monkeypatch.setitem(sys.modules, "broken_cmd", broken)
    monkeypatch.setattr(
        cli,
        "EXTRA_COMMANDS",
        (
            ("eval", "fake_eval_cmd", "eval_command"),
            ("train", "no_such_module_xyz", "train_command"),
            ("data", "broken_cmd", "data_command"),
        ),
    )
    target = typer.Typer()

    @target.command()
    def other() -> None:
        """Other."""

    cli._register_extra_commands(target)
    names = [c.name for c in target.registered_commands]
    assert names == [None, "eval", "data"]  # train absent: its module does not exist
    assert runner.invoke(target, ["eval", "--x", "3"]).stdout.strip() == "eval 3"
    bad = runner.invoke(target, ["data"])
    assert bad.exit_code == 1 and "data command is unavailable" in bad.stderr


@pytest.mark.parametrize(
    "extra,expected",
    [([], None), (["--device", "cuda:1"], None), (["--device", "mps"], 1), (["--batch-size", "3"], 3)],
)
def test_batch_size_left_to_the_pipeline_unless_given_or_not_cuda(tmp_path, monkeypatch, extra, expected):
    scene = make_scene(tmp_path / "scene.tif")
    with patch.object(pipeline, "run", return_value=RunSummary(files=[Path("x")])) as fake:
        result = _invoke(["describe", scene, "-o", tmp_path / "o.gpkg", "--model", "/m", *extra])
    assert result.exit_code == 0, result.output
    assert fake.call_args.args[0].batch_size == expected  # None: chosen from free GPU memory after loading


def test_data_subcommands_are_registered(tmp_path):
    runner = CliRunner()
    made = runner.invoke(app, ["data", "synth", str(tmp_path / "synth"), "--n", "2", "--seed", "3"])
    assert made.exit_code == 0, made.output
    checked = runner.invoke(app, ["data", "check", str(tmp_path / "synth" / "data.txt")])
    assert checked.exit_code == 0, checked.output
    assert "pool: 4 samples" in checked.output
