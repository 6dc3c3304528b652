"""Append-only record of finished tiles next to the output, so ``--resume`` can continue a run.

One JSON object per line: a header (the options that determine per-tile results and the start
time) then one record per finished tile with its pieces (WKB hex, scene pixel coordinates).
A line cut short by a crash is ignored. The journal is removed when the output is complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from geopixel_cli.errors import UserError
from geopixel_cli.vectorize import Piece


def journal_path(output: Path) -> Path:
    """The hidden journal file of an output: ``.<name>.geopixel-journal`` in the same directory."""
    return output.with_name(f".{output.name}.geopixel-journal")


def finished_tiles(path: Path) -> int:
    """How many finished tiles a journal file records (complete lines after the header)."""
    with open(path, "rb") as fh:
        return max(0, sum(1 for line in fh if line.endswith(b"\n")) - 1)


def piece_to_json(piece: Piece) -> dict[str, Any]:
    """A piece as a JSON-safe dict (geometry as WKB hex)."""
    return {
        "tile_id": piece.tile_id,
        "phrase_idx": piece.phrase_idx,
        "phrase": piece.phrase,
        "category": piece.category,
        "score": piece.score,
        "wkb": piece.geometry.wkb_hex,
    }


def piece_from_json(data: dict[str, Any]) -> Piece:
    """Inverse of :func:`piece_to_json`."""
    from shapely import wkb

    return Piece(
        data["tile_id"],
        data["phrase_idx"],
        data["phrase"],
        data["category"],
        data["score"],
        wkb.loads(data["wkb"], hex=True),
    )


class Journal:
    """Writer and reader of a run's journal.

    Args:
        path: Journal file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: Any = None

    def start(self, header: dict[str, Any]) -> None:
        """Begin a new journal with ``header`` (replaces an old one)."""
        self._fh = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - kept open across appends
        self._write({"header": header})

    def resume(self, header: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Open an existing journal for appending after checking it belongs to the same run.

        Args:
            header: The header this run would write; its ``options`` must equal the journal's.

        Returns:
            ``(journal header, finished tile records)``.

        Raises:
            UserError: When the journal was written with different options.
        """
        old, records = self.read()
        if old.get("options") != header["options"]:
            changed = sorted(
                k for k in header["options"] if old.get("options", {}).get(k) != header["options"][k]
            )
            raise UserError(
                f"cannot --resume: the interrupted run used different options ({', '.join(changed)})"
            )
        with open(self.path, "rb+") as fh:  # drop a trailing partial line so appends start clean
            content = fh.read()
            fh.truncate(content.rfind(b"\n") + 1)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        return old, records

    def read(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The header and every complete tile record (a final partial line is ignored)."""
        header: dict[str, Any] = {}
        records: list[dict[str, Any]] = []
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break
                entry = json.loads(line)
                if "header" in entry:
                    header = entry["header"]
                else:
                    records.append(entry)
        return header, records

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append finished tiles and flush them to disk."""
        for record in records:
            self._write(record)

    def _write(self, entry: dict[str, Any]) -> None:
        self._fh.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Close the file (the journal stays on disk)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def remove(self) -> None:
        """Close and delete the journal (the run is complete)."""
        self.close()
        self.path.unlink(missing_ok=True)
