"""LightningDataModule over an LMDB image dataset: uint8 (B, 3, H, W) batches."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ilvr_toolkit.data.lmdb_dataset import LMDBImageDataset

__all__ = ["ImageDataModule"]


class ImageDataModule(pl.LightningDataModule):
    """Training batches of uint8 (B, 3, image_size, image_size) images from an LMDB dataset.

    The training step converts them with ``ilvr_toolkit.images.to_float``. Under DDP the
    Trainer swaps the loader's sampler for a ``DistributedSampler`` (``use_distributed_sampler``,
    on by default), so every rank sees its own shard and the shuffle changes per epoch.
    ``eval_dataloader`` gives the same images unshuffled and unflipped (FID reals, previews).
    With ``return_index`` batches are ``(images, indices)``.
    """

    def __init__(
        self,
        path: str | Path,
        image_size: int,
        batch_size: int = 16,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        flip: bool = True,
        drop_last: bool = True,
        return_index: bool = False,
        multiprocessing_context: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.hparams["path"] = self.path = str(path)  # a plain string in hparams.yaml and checkpoints
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.flip = flip
        self.drop_last = drop_last
        self.return_index = return_index
        self.multiprocessing_context = multiprocessing_context
        self.train_set: LMDBImageDataset | None = None
        self.eval_set: LMDBImageDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = LMDBImageDataset(self.path, self.image_size, self.flip, self.return_index)
            self.eval_set = LMDBImageDataset(self.path, self.image_size, False, self.return_index)

    def _loader(
        self, dataset: LMDBImageDataset, shuffle: bool, drop_last: bool, batch_size: int
    ) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and workers > 0,
            multiprocessing_context=self.multiprocessing_context if workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(
            self.train_set, shuffle=True, drop_last=self.drop_last, batch_size=self.batch_size
        )

    def eval_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Every image once, in index order, no flip (for FID statistics, sampling inputs)."""
        self.setup("predict")
        return self._loader(
            self.eval_set, shuffle=False, drop_last=False, batch_size=batch_size or self.batch_size
        )

    def predict_dataloader(self) -> DataLoader:
        return self.eval_dataloader()
