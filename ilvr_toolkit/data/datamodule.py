"""LightningDataModule over an LMDB image dataset: uint8 (B, 3, H, W) batches."""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ilvr_toolkit.batchjob import worker_ends_on_parents_sigterm
from ilvr_toolkit.cli import UsageError, check_range
from ilvr_toolkit.data.lmdb_dataset import LMDBImageDataset
from ilvr_toolkit.data.lmdb_format import read_info

__all__ = ["ImageDataModule", "LoaderOptions"]


@dataclass(frozen=True)
class LoaderOptions:
    """How the data is read: workers, damaged records (``data.loader.*``).

    Attributes:
        pin_memory: page-locked batches for faster copies to the GPU (ignored without CUDA).
        persistent_workers: keep the worker processes alive between epochs.
        multiprocessing_context: how workers start (fork, spawn, forkserver; null: the
            platform's default). The dataset is safe under each.
        on_bad_record: a record that does not decode stops training with a one-line error naming
            its key and index (error), or is replaced by the next good one and logged (skip).
    """

    pin_memory: bool = True
    persistent_workers: bool = True
    multiprocessing_context: Literal["fork", "spawn", "forkserver"] | None = None
    on_bad_record: Literal["error", "skip"] = "error"


class ImageDataModule(pl.LightningDataModule):
    """Training batches of uint8 (B, 3, image_size, image_size) images from an LMDB dataset.

    The training step converts them with ``ilvr_toolkit.images.to_float``. Under DDP the
    Trainer swaps the loader's sampler for a ``DistributedSampler`` (``use_distributed_sampler``,
    on by default), so every rank sees its own shard and the shuffle changes per epoch.

    Args:
        path: LMDB dataset folder (``python -m ilvr_toolkit.data.prepare`` writes one).
        image_size: side of the images read (one of the sizes stored in the LMDB).
        batch_size: images per batch (per GPU under DDP).
        workers: DataLoader worker processes (0: load in the training process).
        flip: random horizontal flips for training batches.
        drop_last: drop the last incomplete training batch.
        return_index: batches are ``(images, indices)``.
        loader: further DataLoader options.
    """

    def __init__(
        self,
        path: str | Path,
        image_size: int,
        batch_size: int = 16,
        workers: int = 4,
        flip: bool = True,
        drop_last: bool = True,
        return_index: bool = False,
        loader: LoaderOptions = LoaderOptions(),
    ):
        super().__init__()
        check_range("data.batch_size", batch_size, 1)
        check_range("data.workers", workers, 0)
        self.save_hyperparameters(ignore=["loader"])
        # plain types in hparams.yaml and checkpoints (loaded with weights_only=True)
        self.hparams["path"] = self.path = str(path)
        self.hparams["loader"] = asdict(loader)
        self.image_size, self.batch_size, self.loader = image_size, batch_size, loader
        self.train_set: LMDBImageDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self._check_path()
            hp, skip = self.hparams, self.loader.on_bad_record
            self.train_set = LMDBImageDataset(self.path, self.image_size, hp.flip, hp.return_index, skip)

    def _check_path(self) -> None:
        """:class:`UsageError` naming ``--data.path`` for a path without an LMDB (an image folder) or an
        LMDB without the model's image size (a damaged LMDB is the reader's error, exit status 1)."""
        build = f"python -m ilvr_toolkit.data.prepare IMAGES --output.dir OUT.lmdb --size {self.image_size}"
        if Path(self.path).is_file():
            raise UsageError(
                f"--data.path {self.path}: is a file, expected an LMDB folder; build one with {build}"
            )
        try:
            sizes = read_info(self.path).sizes
        except FileNotFoundError as error:
            raise UsageError(
                f"--data.path {self.path}: {error}; build one from images with {build}"
            ) from None
        if self.image_size not in sizes:
            raise UsageError(
                f"--data.path {self.path}: has no images of size {self.image_size} (the model's image_size); "
                f"sizes available: {', '.join(map(str, sizes)) or 'none'}; build one with {build} or "
                "choose a model of that size"
            )

    def check_batch_size(self, world_size: int = 1) -> None:
        """:class:`UsageError` unless each of ``world_size`` processes gets a full training batch
        (the sampler gives each ``ceil(len / world_size)`` images; ``drop_last`` drops a partial one)."""
        self.setup("fit")
        total = len(self.train_set)
        each = -(-total // world_size)
        if self.hparams.drop_last and self.batch_size > each:
            images = f"the {each} images each of {world_size} processes gets (dataset: {total})"
            images = images if world_size > 1 else f"the dataset's {total} images"
            raise UsageError(
                f"--data.batch_size {self.batch_size}: larger than {images} "
                f"(the last partial batch is dropped); use at most {each}"
            )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        workers, options = self.hparams.workers, self.loader
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=self.hparams.drop_last,
            num_workers=workers,
            pin_memory=options.pin_memory and torch.cuda.is_available(),
            persistent_workers=options.persistent_workers and workers > 0,
            multiprocessing_context=options.multiprocessing_context if workers > 0 else None,
            worker_init_fn=worker_ends_on_parents_sigterm,  # they inherit Preemption's blocked SIGTERM
        )
