"""The stream of training micro-batches: micro-step index → this rank's collated batch.

The batch of micro-step k is a pure function of (pool, seed, k, rank) (see
:mod:`geopixel_cli.train.mixture`), so the stream can start anywhere (resume) and can be produced
by DataLoader worker processes (``workers``) while the main process trains. SAM-2 image features
may be cached per image in the main process (the encoder is frozen and sees no augmentation).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from geopixel.config import GeoPixelConfig
from geopixel.grounding import ImageFeatures
from geopixel.tokenizer import GeoPixelTokenizer
from geopixel.training import TrainBatch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from geopixel_cli.train.collate import collate, make_example
from geopixel_cli.train.mixture import Position, batch_indices, batches_per_epoch
from geopixel_cli.train.records import Record, load_sample


class StepDataset(Dataset):
    """Map-style dataset whose item k is the collated micro-batch of micro-step k for one rank.

    Args:
        pool: The expanded training pool.
        tokenizer: GeoPixel tokenizer.
        config: Model configuration.
        hd_num: Crop budget.
        seed: Data-order seed.
        batch_size: Samples per rank per micro-batch.
        length: Number of micro-steps in the run.
        rank: This process's rank.
        world: Number of processes.
    """

    def __init__(
        self,
        pool: list[Record],
        *,
        tokenizer: GeoPixelTokenizer,
        config: GeoPixelConfig,
        hd_num: int,
        seed: int,
        batch_size: int,
        length: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.pool, self.tokenizer, self.config, self.hd_num = pool, tokenizer, config, hd_num
        self.seed, self.batch_size, self.length, self.rank, self.world = seed, batch_size, length, rank, world
        self.per_epoch = batches_per_epoch(len(pool), batch_size=batch_size, world_size=world)

    def __len__(self) -> int:
        return self.length

    def records(self, micro_step: int) -> list[Record]:
        """The records of a micro-step for this rank."""
        pos = Position(micro_step // self.per_epoch, micro_step % self.per_epoch)
        idx = batch_indices(
            len(self.pool),
            pos,
            seed=self.seed,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world,
        )
        return [self.pool[i] for i in idx]

    def __getitem__(self, micro_step: int) -> tuple[TrainBatch, list[str]]:
        recs = self.records(micro_step)
        examples = [
            make_example(load_sample(r), tokenizer=self.tokenizer, config=self.config, hd_num=self.hd_num)
            for r in recs
        ]
        return collate(examples, pad_id=self.config.llm.pad_token_id), [str(r.image) for r in recs]


class BatchStream:
    """Iterate the micro-batches from ``start`` on, on ``device``, optionally with cached SAM-2 features.

    Args:
        dataset: The step dataset.
        model: The model (its grounding encoder fills the cache).
        device: Training device.
        start: First micro-step.
        workers: DataLoader worker processes (0 = build batches in the main process).
        cache_sam_features: Cache SAM-2 features per image path.
    """

    def __init__(
        self,
        dataset: StepDataset,
        model: nn.Module,
        device: torch.device,
        *,
        start: int,
        workers: int = 0,
        cache_sam_features: bool = False,
    ) -> None:
        self.model, self.device, self.cache_on = model, device, cache_sam_features
        self.cache: dict[str, ImageFeatures] = {}
        loader = DataLoader(
            dataset,
            batch_size=None,
            sampler=range(start, len(dataset)),
            num_workers=workers,
            prefetch_factor=2 if workers else None,
            pin_memory=device.type == "cuda",
            generator=torch.Generator(),  # never draw from the global RNG (dropout, exact resume)
        )
        self._iter: Iterator[tuple[TrainBatch, list[str]]] = iter(loader)

    def next(self) -> TrainBatch:
        """The next micro-batch, moved to the device."""
        cpu_batch, keys = next(self._iter)
        batch = cpu_batch.to(self.device)
        if self.cache_on:
            batch.sam_features = self._features(keys, batch)
            batch.sam_pixels = None
        return batch

    def _features(self, keys: list[str], batch: TrainBatch) -> ImageFeatures:
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        if missing and batch.sam_pixels is not None:
            feats = self.model.grounding.encode_images(batch.sam_pixels[missing])
            for j, i in enumerate(missing):
                self.cache[keys[i]] = ImageFeatures(
                    feats.image_embed[j : j + 1], (feats.high_res[0][j : j + 1], feats.high_res[1][j : j + 1])
                )
        parts = [self.cache[k] for k in keys]
        return ImageFeatures(
            torch.cat([p.image_embed for p in parts]),
            (torch.cat([p.high_res[0] for p in parts]), torch.cat([p.high_res[1] for p in parts])),
        )
