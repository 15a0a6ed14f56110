"""Batches for the training loop: uint8 images -> shuffled, augmented, normalised float batches on the device.

In-memory sets are shuffled by an index permutation drawn from ``seed`` and the epoch number, so every
epoch's order is reproducible (and resumable) without storing it. Sets too large for memory are decoded
per batch by DataLoader workers and then take the same device-side steps; on a GPU, a streamed folder of JPEGs is
decoded there instead (``cnnkit/data/device_decode.py``): the workers only read the files.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
from dataclasses import dataclass
from typing import Iterator

import torch

from cnnkit import compiled
from cnnkit.choices import DECODE_CHOICES
from cnnkit.data import device_decode
from cnnkit.data.augment import (
    alternating_flips, coin_flips, crop, crop_flip_normalize, crop_offsets, cutout, flip_bits, mirror, policy_augment,
)
from cnnkit.data.images import load_image
from cnnkit.data.sources import ImageSet
from cnnkit.errors import DataError, UserError


@dataclass
class Augment:
    crop_pad: int = 0  # pixels of random translation (RandomCrop padding)
    flip: bool = False
    alternate_flip: bool = False  # flips alternate per image from epoch to epoch instead of coin tosses
    cutout: int = 0  # side in pixels of a zeroed square per image (0: none)
    policy: str | None = None  # "randaugment" or "trivialaugment": torchvision's per-image policies
    random_erasing: float = 0.0  # probability of torchvision's RandomErasing per image


def channel_stats(data: ImageSet, max_images: int = 10000) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of ``data`` in [0, 1] units, from up to ``max_images`` images."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data), generator=g)[:max_images]
    if data.images is not None:
        x = data.images[idx].float() / 255
    else:
        x = torch.stack([load_image(data.files[i], data.channels, data.size) for i in idx[:500].tolist()]).float() / 255
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return mean.tolist(), std.tolist()


class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, data: ImageSet) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Files are checked before training; one that breaks later (changed on disk) is dropped from its
        # batch instead of killing the worker with a traceback nobody can read.
        try:
            return load_image(self.data.files[i], self.data.channels, self.data.size), self.data.labels[i]
        except DataError:
            return torch.zeros(self.data.channels, self.data.size, self.data.size, dtype=torch.uint8), torch.tensor(-1)


class _Order(torch.utils.data.Sampler):
    """A sampler whose indices the loader replaces each epoch, so that a DataLoader can keep its workers."""

    def __init__(self) -> None:
        self.indices: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class BatchLoader:
    """Iterates over (images, labels) batches of ``data``: float, normalised, channels_last, on ``device``.

    ``fused`` (set by the training loop for runs long enough to repay compiling): on a CPU, a batch's random
    crop, flip and normalisation run as one compiled loop (``crop_flip_normalize``), the same values bit for bit.

    ``decode`` (sets streamed from files only): "cpu" decodes each image in the workers; "device" has the workers
    read the bytes and decodes each batch of JPEGs on ``device``, where training takes random resized crops
    (``device_decode``) instead of padded translations; "auto" is "device" on CUDA when every file is a JPEG.
    """

    fused: bool = False

    def __init__(
        self,
        data: ImageSet,
        batch_size: int,
        mean: list[float],
        std: list[float],
        device: torch.device,
        shuffle: bool = False,
        augment: Augment | None = None,
        seed: int = 0,
        drop_last: bool = False,
        channels_last: bool = True,
        workers: int = 2,
        rank: int = 0,
        world: int = 1,
        balanced: bool = False,
        decode: str = "auto",
    ) -> None:
        """``batch_size`` is the global batch: with ``world`` processes, each one gets its ``rank``'s share of
        every batch when shuffling (training), or every ``world``-th image when not (evaluation: each image is
        seen exactly once, with no padding). ``balanced`` (with ``shuffle``) draws every class equally often."""
        if decode not in DECODE_CHOICES:
            raise UserError(f"--decode must be one of {', '.join(DECODE_CHOICES)}, not '{decode}'")
        if shuffle and batch_size % world:
            raise UserError(f"--batch-size {batch_size} does not split evenly over {world} processes")
        self.rank, self.world = rank, world
        self.data, self.batch_size, self.device = data, batch_size, device
        self.shuffle, self.augment, self.seed, self.drop_last = shuffle, augment, seed, drop_last
        self.channels_last, self.workers, self.balanced = channels_last, workers, balanced
        self.epoch = 0
        self.skipped = 0  # images dropped at run time by the streaming path
        self._byte_batches: torch.utils.data.DataLoader | None = None  # the device-decoding path's, made once
        self._decoding = 0  # device-decoding epochs under way (one normally; a second gets its own DataLoader)
        # Normalisation fused into the uint8 -> float conversion: (x - 255*mean) / (255*std).
        self.shift = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.scale = 1.0 / (torch.tensor(std, device=device).view(1, -1, 1, 1) * 255)
        # On a GPU the whole uint8 set lives in device memory: no host-to-device copy per step.
        self.images = data.images
        if data.images is not None and device.type != "cpu":
            self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        # Beside the images: indexing it with a batch's device indices then needs no copy back to the host,
        # which on a GPU would make every step wait for the one before.
        self.flip_bits = flip_bits(len(data), seed).to(self.labels.device)
        auto = decode == "auto" and device.type == "cuda" and data.images is None and device_decode.all_jpeg(data.files)
        self.decode_on_device = data.images is None and (decode == "device" or auto)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.data) if self.shuffle else len(range(self.rank, len(self.data), self.world))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self) -> torch.Tensor:
        """This epoch's order of sample indices (for evaluation: this process's share)."""
        n = len(self.data)
        if not self.shuffle:
            return torch.arange(self.rank, n, self.world)
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        if self.balanced:
            # Each draw picks a class uniformly, then an image of it: sampling weights 1 / class count, with
            # replacement (rare images repeat within an epoch), like torch's WeightedRandomSampler, but drawn
            # from the same per-epoch seed as the shuffled order, so a resumed epoch draws the same batches.
            per_image = 1.0 / torch.bincount(self.data.labels).double()[self.data.labels]
            return torch.multinomial(per_image, n, replacement=True, generator=g)
        return torch.randperm(n, generator=g)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches()

    def batches(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's batches from batch number ``start`` on (a resumed epoch starts mid-way)."""
        order = self.order()[start * self.batch_size :]
        if self.data.images is None:
            yield from self._stream(order, start)
            return
        share = self.batch_size // self.world if self.shuffle else self.batch_size
        # The epoch's order goes to the device once: a host-to-device copy per batch would make a GPU's host
        # wait for every step queued before it.
        order = order.to(self.device)
        for i in range(start, len(self)):
            idx = order[(i - start) * self.batch_size : (i - start + 1) * self.batch_size]
            # index_select copies whole images; advanced indexing (images[idx]) gathers value by value, many times
            # slower (docs/design.md, "The data path").
            images = self._augment_to_float(self.images.index_select(0, idx), self._generator(i), idx)
            if self.shuffle and self.world > 1:
                # Every process draws the augmentation of the whole global batch and keeps its share, so
                # N processes see exactly the images one process would.
                part = slice(self.rank * share, (self.rank + 1) * share)
                images, idx = images[part], idx[part]
            yield images, self.labels[idx]

    def batch_seed(self, batch: int) -> int:
        """The seed of batch number ``batch`` of this epoch, from which its augmentation (and mixing) is drawn."""
        # One seed per (run seed, epoch, batch): the augmentation of any batch is known without replaying the
        # batches before it, which is what makes a resumed epoch identical to an uninterrupted one.
        return (self.seed * 100003 + self.epoch) * 1000003 + batch

    def _generator(self, batch: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.batch_seed(batch))

    def _stream(self, order: torch.Tensor, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batch = self.batch_size
        if self.shuffle and self.world > 1:
            batch = self.batch_size // self.world
            whole = order[: len(order) // self.batch_size * self.batch_size]  # whole global batches only
            order = whole.view(-1, self.world, batch)[:, self.rank].flatten()
        on_device = self.decode_on_device
        if on_device:
            loader = self._bytes_loader(batch, keep=not self._decoding)  # an epoch begun amid another: its own
            loader.sampler.indices = order.tolist()
        else:
            loader = torch.utils.data.DataLoader(
                _FileDataset(self.data), batch_size=batch, sampler=order.tolist(), drop_last=self.drop_last,
                num_workers=self.workers, persistent_workers=False, pin_memory=self.device.type == "cuda",
            )
        loaded = (
            (i, images, labels, order[(i - start) * batch : (i - start + 1) * batch][: len(labels)], self._generator(i))
            for i, (images, labels) in itertools.islice(enumerate(loader, start), max(0, len(self) - start))
        )
        for i, images, labels, index, g in self._decoded_ahead(loaded) if on_device else loaded:
            good = labels >= 0  # an image that failed to decode comes back labelled -1: drop it
            if not good.all():
                self.skipped += int((~good).sum())
                images, labels = images[good.to(images.device)], labels[good]
            images = self._augment_to_float(images.to(self.device, non_blocking=True), g, index[good],
                                            translate=not on_device)
            yield images, labels.to(self.device, non_blocking=True)

    def _bytes_loader(self, batch: int, keep: bool) -> torch.utils.data.DataLoader:
        """A DataLoader whose workers read the files' bytes for device decoding. With ``keep``, the one made once,
        whose workers stay from epoch to epoch (only its sampler's order changes): with the decoding off the CPU,
        starting a new set of worker processes each epoch would cost a good part of an epoch of a small set."""
        if keep and self._byte_batches is not None:
            return self._byte_batches
        loader = torch.utils.data.DataLoader(
            device_decode.FileBytes(self.data.files, self.data.labels, self.data.channels), batch_size=batch,
            sampler=_Order(), drop_last=self.drop_last, num_workers=self.workers,
            persistent_workers=keep and self.workers > 0, collate_fn=device_decode.collate,
        )
        if keep:
            self._byte_batches = loader
        return loader

    def _decoded_ahead(self, loaded: Iterator[tuple]) -> Iterator[tuple]:
        """The workers' bytes of each batch decoded, cropped and resized on the device (crops drawn from the
        batch's generator first), one batch ahead in a thread: the decode call holds its thread until the device
        has decoded the batch, time in which this one queues the training step of the batch before."""
        def decode(i: int, encoded: tuple, labels: torch.Tensor, index: torch.Tensor, g: torch.Generator) -> tuple:
            with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
                images, labels, ready = device_decode.decode_batch_async(
                    encoded, labels, [self.data.files[k] for k in index.tolist()], self.data.channels, self.data.size,
                    self.device, g if self.augment is not None else None)
            return i, images, labels, index, g, ready

        def taken(future: concurrent.futures.Future) -> tuple:
            # The wait is queued here, in the thread that queues the steps, after the step of the batch before.
            i, images, labels, index, g, ready = future.result()
            if ready is not None:
                device_decode.use_on_current_stream(images, ready)
            return i, images, labels, index, g

        self._decoding += 1
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                ahead = None
                for item in loaded:
                    submitted = pool.submit(decode, *item)
                    if ahead is not None:
                        yield taken(ahead)
                    ahead = submitted
                if ahead is not None:
                    yield taken(ahead)
        finally:
            self._decoding -= 1

    def _augment_to_float(self, images: torch.Tensor, g: torch.Generator, index: torch.Tensor,
                          translate: bool = True) -> torch.Tensor:
        """uint8 batch -> augmented, normalised float batch. The draws come from ``g`` in one order (crop, flip,
        cutout, policy), whether the steps then run one by one or, where ``fused``, as one compiled loop.
        ``translate`` False: no padded random crop (the batch already had its random resized crop)."""
        a = self.augment
        if a is None:
            return self._to_float(images)
        offsets = crop_offsets(len(images), a.crop_pad, g) if a.crop_pad > 0 and translate else None
        flips = None
        if a.flip:
            flips = alternating_flips(self.flip_bits[index.to(self.flip_bits.device)], self.epoch) if a.alternate_flip \
                else coin_flips(len(images), g)
        # Compiled for one shape, the full batch: a shorter one runs the steps one by one (an image that failed to
        # decode; and every streamed batch of a multi-process run, each process's share).
        if (self.fused and offsets is not None and not a.cutout and a.policy is None and not a.random_erasing
                and images.device.type == "cpu" and len(images) == self.batch_size and compiled.available()):
            flips = flips if flips is not None else torch.zeros(len(images), dtype=torch.bool)
            x = crop_flip_normalize(images, a.crop_pad, offsets, flips, self.shift, self.scale)
            return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        if offsets is not None:
            images = crop(images, a.crop_pad, offsets)
        if flips is not None:
            images = mirror(images, flips)
        images = cutout(images, a.cutout, g)
        return self._to_float(policy_augment(images, a.policy, a.random_erasing, g))

    def _to_float(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> normalised float batch."""
        # Normalised in place while still N x C x H x W, then reordered: in channels_last order the per-channel
        # shift and scale vary along the innermost dimension (3 long), and the same two steps ran markedly
        # slower (docs/design.md, "The data path"; the same numbers bit for bit).
        x = images.to(torch.float32, copy=True)  # a copy even if it came as float: normalised in place next
        x.sub_(self.shift).mul_(self.scale)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
