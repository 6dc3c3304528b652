"""Dataset mixtures (the reference's ``data.txt``) and the deterministic, resumable sample order.

``--data`` accepts:

* a mixture file (``.txt``): one ``<json list or RRSIS-D root> <number>`` per line (``#`` comments
  allowed). As with the reference's ``--given_num True`` (both shipped scripts) the number is
  **thousands of samples**: n = int(number·1000); a longer list is subsampled without replacement,
  a shorter one topped up by sampling with replacement. A number written ``x1.5`` (or ``1.5x``) is a
  length multiplier instead (the reference's ``given_num False``).
* a JSON list (GeoPixelD format), used once (multiplier 1);
* a native RRSIS-D root (``rrsisd/refs(unc).p`` inside), train split, multiplier 1;
* a folder holding ``data.txt`` or ``GeoPixelD.json``.

The expanded pool is drawn once from the seed; each epoch is a seeded permutation of it, so a
position (epoch, step) identifies exactly which records come next — that is what resume stores.
Unlike the reference (one item = ``batch_size`` records of one file), batches mix files freely.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from geopixel_cli.train.records import Record, TrainDataError, read_json_list, resolve_path


@dataclass(frozen=True)
class MixtureEntry:
    """One mixture line.

    Attributes:
        path: JSON list or RRSIS-D root.
        number: Thousands of samples, or a multiplier when ``is_ratio``.
        is_ratio: Interpret ``number`` as a length multiplier.
    """

    path: Path
    number: float
    is_ratio: bool

    def target_count(self, available: int) -> int:
        """Number of samples this entry contributes to the pool."""
        if self.is_ratio:
            return max(int(round(available * self.number)), 0)
        return int(self.number * 1000)


def _parse_number(token: str, where: str) -> tuple[float, bool]:
    is_ratio = token.startswith("x") or token.endswith("x")
    try:
        value = float(token.strip("x"))
    except ValueError as exc:
        raise TrainDataError(f"{where}: sample count {token!r} is not a number") from exc
    if value <= 0:
        raise TrainDataError(f"{where}: sample count must be positive, got {token!r}")
    return value, is_ratio


def read_mixture(path: Path) -> list[MixtureEntry]:
    """Parse a ``data.txt``-style mixture file.

    Args:
        path: The mixture file.

    Returns:
        Its entries.

    Raises:
        TrainDataError: Unreadable file, malformed line, or no entries at all.
    """
    if not path.is_file():
        raise TrainDataError(f"{path}: mixture file not found")
    entries = []
    base = path.resolve().parent
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        where = f"{path}:{lineno}"
        if len(parts) != 2:
            raise TrainDataError(f"{where}: expected '<json path> <number>', got {line.strip()!r}")
        number, is_ratio = _parse_number(parts[1], where)
        entries.append(MixtureEntry(resolve_path(parts[0], base), number, is_ratio))
    if not entries:
        raise TrainDataError(f"{path}: empty mixture (no '<json path> <number>' lines)")
    return entries


def entries_for(data: Path) -> list[MixtureEntry]:
    """Turn a ``--data`` argument into mixture entries (see the module docstring).

    Args:
        data: Mixture file, JSON list, RRSIS-D root or a folder with ``data.txt``/``GeoPixelD.json``.

    Returns:
        Entries.

    Raises:
        TrainDataError: The path is none of those.
    """
    from geopixel_cli.train.rrsisd import is_rrsisd_root

    if data.is_dir():
        if is_rrsisd_root(data):
            return [MixtureEntry(data, 1.0, True)]
        for name in ("data.txt", "GeoPixelD.json"):
            if (data / name).is_file():
                return entries_for(data / name)
        raise TrainDataError(f"{data}: folder has no data.txt, GeoPixelD.json or rrsisd/refs(unc).p")
    if data.suffix.lower() == ".json":
        return [MixtureEntry(data, 1.0, True)]
    if not data.exists():
        raise TrainDataError(f"{data}: dataset path not found")
    return read_mixture(data)


def load_entry(entry: MixtureEntry, *, check_files: bool = True) -> list[Record]:
    """Records of one entry (a JSON list or a native RRSIS-D train split)."""
    from geopixel_cli.train.rrsisd import is_rrsisd_root, rrsisd_records

    if entry.path.is_dir() and is_rrsisd_root(entry.path):
        return rrsisd_records(entry.path, split="train")
    return read_json_list(entry.path, check_files=check_files)


def build_pool(entries: list[MixtureEntry], *, seed: int, check_files: bool = True) -> list[Record]:
    """Expand a mixture into the training pool (subsample / top up per entry, seeded).

    Args:
        entries: Mixture entries.
        seed: Random seed.
        check_files: Validate images and masks while reading.

    Returns:
        The pool, in a deterministic order.

    Raises:
        TrainDataError: The mixture yields no samples.
    """
    rng = random.Random(seed)
    pool: list[Record] = []
    for entry in entries:
        records = load_entry(entry, check_files=check_files)
        n = entry.target_count(len(records))
        if n <= len(records):
            pool.extend(rng.sample(records, n))
        else:
            pool.extend(records + rng.choices(records, k=n - len(records)))
    if not pool:
        raise TrainDataError(f"empty mixture: {', '.join(str(e.path) for e in entries)} give no samples")
    return pool


def epoch_order(pool_size: int, *, seed: int, epoch: int) -> list[int]:
    """Seeded permutation of the pool for one epoch."""
    order = list(range(pool_size))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


@dataclass(frozen=True)
class Position:
    """Where the data stream stands: epoch and the number of batches already consumed in it."""

    epoch: int = 0
    batch: int = 0


def batches_per_epoch(pool_size: int, *, batch_size: int, world_size: int = 1) -> int:
    """Number of (per-rank) batches in an epoch; the tail that does not fill every rank is dropped."""
    return max(pool_size // (batch_size * world_size), 1)


def batch_indices(
    pool_size: int, pos: Position, *, seed: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> list[int]:
    """Pool indices of the batch at ``pos`` for one rank.

    Args:
        pool_size: Pool length.
        pos: Epoch and batch number.
        seed: Random seed.
        batch_size: Records per rank per batch.
        rank: This process's rank.
        world_size: Number of processes.

    Returns:
        ``batch_size`` indices (wrapping around when the pool is smaller than one global batch).
    """
    order = epoch_order(pool_size, seed=seed, epoch=pos.epoch)
    start = (pos.batch * world_size + rank) * batch_size
    return [order[(start + k) % pool_size] for k in range(batch_size)]
