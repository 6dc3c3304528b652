from dataclasses import replace

import pytest
from shapely.geometry import box

from geopixel_cli.errors import UserError
from geopixel_cli.journal import Journal, journal_path, piece_from_json, piece_to_json
from geopixel_cli.vectorize import Piece


def test_round_trip_and_partial_last_line(tmp_path):
    out = tmp_path / "o.gpkg"
    journal = Journal(journal_path(out))
    assert journal.path.name == ".o.gpkg.geopixel-journal"
    piece = Piece(3, 1, "red roofs", "red roof", 0.75, box(10, 20, 30, 40))
    journal.start({"options": {"tile_size": 800}, "started": "t0"})
    journal.append([{"tile_id": 3, "pieces": [piece_to_json(piece)]}])
    journal.close()
    with open(journal.path, "a") as fh:
        fh.write('{"tile_id": 4, "pie')  # a crash in the middle of a line
    header, records = Journal(journal.path).read()
    assert header["started"] == "t0" and [r["tile_id"] for r in records] == [3]
    back = piece_from_json(records[0]["pieces"][0])
    assert back.geometry.equals_exact(piece.geometry, 0) and back.score == 0.75 and back.phrase == "red roofs"
    resumed = Journal(journal.path)
    resumed.resume({"options": {"tile_size": 800}})
    resumed.append([{"tile_id": 4, "pieces": []}])
    resumed.close()
    assert [r["tile_id"] for r in Journal(journal.path).read()[1]] == [3, 4]
    with pytest.raises(UserError, match="tile_size"):
        Journal(journal.path).resume({"options": {"tile_size": 640}})
    resumed.remove()
    assert not journal.path.exists()


def test_stale_journal_without_resume_warns_once(tmp_path, caplog):
    import logging

    from cli_scenes import Rect, ScriptedModel, make_scene

    from geopixel_cli.pipeline import run
    from geopixel_cli.runconfig import RunConfig

    scene = make_scene(tmp_path / "s.tif", rects=(Rect(150, 50, 230, 90),))
    out = tmp_path / "o.gpkg"
    config = RunConfig("describe", str(scene), out, "scripted", tile_size=200, overlap=40, progress=False)
    with pytest.raises(UserError, match="--resume"):
        run(config, model=ScriptedModel(fail_after=3))
    assert journal_path(out).exists()
    with caplog.at_level(logging.WARNING, logger="geopixel_cli"):
        run(config, model=ScriptedModel())
    warnings = [r.getMessage() for r in caplog.records if "interrupted run" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "3 finished tiles" in warnings[0] and "--resume" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="geopixel_cli"):
        run(replace(config, overwrite=True), model=ScriptedModel())  # no journal left: no warning
    assert not [r for r in caplog.records if "interrupted run" in r.getMessage()]
