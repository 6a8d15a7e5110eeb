"""From a split to batches: transforms, a dataset that survives bad files, and a resumable epoch sampler."""
from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import os
import signal
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torchvision.transforms import v2

from .images import ImageError, open_image

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_size(image_size: int) -> int:
    """Eval resize before the centre crop, in ImageNet's 256/224 proportion."""
    return round(image_size * 256 / 224)


def build_transform(image_size: int, train: bool, jitter: float = 0.2, resize: str = "crop") -> v2.Compose:
    """PIL image → uint8 CHW tensor; augmentations run on uint8. Normalisation happens later, on the device.

    resize crop: the short side is resized and the centre kept (a wide photo loses its ends); pad: the whole photo is
    letterboxed into the square first (grey bands), so the ends of a wide car stay in view."""
    fit = [Letterbox(image_size)] if resize == "pad" else []
    if train:
        steps = [*fit, v2.RandomResizedCrop(image_size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        if jitter:
            steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    elif fit:
        steps = fit
    else:
        steps = [v2.Resize(resize_size(image_size), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([v2.ToImage(), *steps])


class Letterbox(torch.nn.Module):
    """Resize the long side to `size` and pad the short one, centred, with the ImageNet mean colour: the bands
    normalise to about 0 and carry no signal."""

    FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        left, top, right, bottom = letterbox_box((w, h), self.size)
        image = v2.functional.resize(image, [bottom - top, right - left], antialias=True)
        return v2.functional.pad(image, [left, top, self.size - right, self.size - bottom], fill=list(self.FILL))


def letterbox_box(size: tuple[int, int], square: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a (width, height) photo letterboxed into a square of that side."""
    scale = square / max(size)
    w, h = max(1, round(size[0] * scale)), max(1, round(size[1] * scale))
    left, top = (square - w) // 2, (square - h) // 2
    return left, top, left + w, top + h


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: no small host-to-device copy on every batch."""
    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


def to_input(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A uint8 batch → ImageNet-normalised floats on the device: the host copies 4x fewer bytes, the GPU does the
    arithmetic."""
    mean, std = _mean_std(device)
    x = images.to(device, non_blocking=True).float().div_(255).sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and device.type == "cuda" else x


def split_images(cfg, split, which: str, train: bool = False, backdrops=None) -> "CarImages":
    """One split of a run (cfg: its TrainConfig; split: a dataset.split.Split) as a dataset: training augmentation
    when `train`, the evaluation transform otherwise; the pre-resized copy of the dataset when there is one.
    `backdrops` (dataset.negatives.Backdrops): some training cars are moved onto photos without a car."""
    from .resized import ResizedCache
    paths, labels, boxes = split.subset(which)
    transform = build_transform(cfg.image_size, train, cfg.jitter, cfg.resize)
    return CarImages(cfg.data, paths, labels, boxes, transform, cfg.crop_bbox, cfg.image_size,
                     ResizedCache.find(cfg.data, cfg.image_size), backdrops)


class CarImages(Dataset):
    """Images of a split; an unreadable file yields None so the batch goes on without it. Boxes (1-based x1 y1 x2
    y2) crop the photo with `crop_bbox`; with `backdrops`, a seeded sample may have its car moved onto a backdrop."""

    def __init__(self, root: str, paths: list[str], labels: list[int], bboxes: list | None = None,
                 transform=None, crop_bbox: bool = False, image_size: int = 224, cache=None, backdrops=None):
        self.root, self.paths, self.labels, self.cache = root, paths, labels, cache
        self.bboxes = bboxes if bboxes is not None else [None] * len(paths)
        self.crop_bbox = crop_bbox
        self.backdrops = backdrops if not crop_bbox else None  # a crop to the box shows no background to move
        self.transform = transform
        self.draft_size = resize_size(image_size)

    def boxed(self) -> int:
        """How many of the images have a car box."""
        return sum(box is not None for box in self.bboxes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]):
        """`item` is an index, or (index, seed) from EpochSampler: then the augmentation draws from that seed alone,
        whichever worker process decodes the sample and however many did before it (exact resume)."""
        i, seed = item if isinstance(item, tuple) else (item, None)
        path, bbox = os.path.join(self.root, self.paths[i]), self.bboxes[i]
        hit = self.cache.lookup(self.paths[i]) if self.cache else None
        if hit:  # the pre-resized copy (carapp.dataset.resized); boxes scale with it
            path, scale = hit
            bbox = [v * scale for v in bbox] if bbox else None
        backdrop = self.backdrops.pick(seed) if self.backdrops and seed is not None and bbox else None
        try:  # a car to move is decoded at full size: its box is in the file's pixels
            img = open_image(path, bbox if self.crop_bbox else None,
                             draft_size=self.draft_size if backdrop is None else None)
        except (ImageError, OSError) as exc:
            log.debug("skipping %s: %s", self.paths[i], exc)
            return i, None
        if backdrop is not None:
            img = self.backdrops.place(img, bbox, backdrop)
        if seed is None:
            return i, (self.transform(img), self.labels[i])
        rng = torch.default_generator  # the CPU stream the transforms draw from (torch.manual_seed costs 100x more)
        saved = rng.get_state() if get_worker_info() is None else None  # in the trainer itself: dropout's stream
        rng.manual_seed(seed)
        try:
            return i, (self.transform(img), self.labels[i])
        finally:
            if saved is not None:
                rng.set_state(saved)


class Batch(NamedTuple):
    images: torch.Tensor | None     # None when every file of the batch was unreadable
    labels: torch.Tensor | None
    indices: list[int]              # dataset indices of the images, in order
    bad: list[int]                  # dataset indices of unreadable files


def collate_skip_bad(items) -> Batch:
    """Stack the good samples; report the indices of the bad ones so the trainer can list them."""
    good = [(i, s) for i, s in items if s is not None]
    bad = [i for i, s in items if s is None]
    if not good:
        return Batch(None, None, [], bad)
    return Batch(torch.stack([s[0] for _, s in good]), torch.tensor([s[1] for _, s in good]),
                 [i for i, _ in good], bad)


class EpochSampler(Sampler[tuple[int, int]]):
    """(index, augmentation seed) pairs for one epoch, fixed by (seed, epoch): weighted with replacement or a plain
    shuffle. The order and every sample's seed are functions of the epoch and the position in it, so a run stopped
    at step k resumes at step k of the same order with the same augmentations.
    Under torch.distributed each rank takes every world-th position of the same order.
    """

    def __init__(self, labels: list[int], weighted: bool, num_samples: int, seed: int = 0,
                 rank: int = 0, world: int = 1):
        self.weighted, self.num_samples, self.seed = weighted, num_samples, seed
        self.rank, self.world = rank, world
        counts = torch.bincount(torch.tensor(labels))
        self.weights = (1.0 / counts.clamp(min=1).double())[torch.tensor(labels)]
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch number and how many of this rank's samples were already consumed."""
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weighted:
            idx = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g)
        else:
            idx = torch.randperm(len(self.weights), generator=g)
            idx = idx.repeat(self.num_samples // len(idx) + 1)[: self.num_samples]
        return idx[self.rank:: self.world].tolist()

    def __iter__(self):
        base = (self.seed * 1_000_003 + self.epoch) * 100_000_007
        positions = range(self.rank, self.num_samples, self.world)
        pairs = [(i, (base + pos) % 2**62) for i, pos in zip(self.order(), positions)]
        return iter(pairs[self.start:])

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world)) - self.start


def ignore_stop_signals(_worker_id: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the main process: a signal sent to the whole process group (Ctrl-C,
    `timeout`, systemd, Docker, Spaces) must not kill them mid-batch, or the main process could not finish its step
    and save. The main process shuts them down itself, and they exit on their own if it dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@atexit.register  # registered after multiprocessing's own exit handler, so it runs first
def _kill_leftover_workers() -> None:
    """A process that ends with loader workers still running kills them. Normally the loader has shut them down;
    but an uncaught exception keeps its traceback (sys.last_traceback), hence the loader, alive past exit, and then
    multiprocessing's exit handler sends the workers SIGTERM, which they ignore, and waits for them forever: the
    process never ends and holds its job slot and memory (seen with a corrupt zip member)."""
    for child in multiprocessing.active_children():
        if child.daemon:  # loader workers are daemonic; a process someone started on purpose is not ours to end
            child.kill()
            child.join(timeout=10)


def make_loader(dataset: CarImages, batch_size: int, workers: int, sampler=None, pin: bool = False) -> DataLoader:
    # its own generator: starting an iterator (a new epoch, a resumed run) draws the workers' base seed from it,
    # never from the global stream that dropout uses
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      collate_fn=collate_skip_bad, pin_memory=pin, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers else None, worker_init_fn=ignore_stop_signals if workers else None,
                      generator=torch.Generator().manual_seed(0))
