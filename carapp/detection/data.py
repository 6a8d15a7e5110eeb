"""What a detector trains on: the dataset's own photos and their car boxes, tiled into mosaics.

A CompCars photo holds one labelled car, most of the frame; the photos a detector must read hold several, of any
size. So each training image is a mosaic: a k x k grid (k from MOSAIC_GRIDS) of photos, each scaled into its cell,
boxes with it; k = 1 keeps whole photos, k = 4 makes cars a quarter of their size. A quarter of the cells show a
photo without a car instead (`--negatives`, by default the generated ones outlier exposure uses): backgrounds,
textures and clutter are then something the detector has seen and learned are not cars. Half the mosaics are cut to a
window (larger cars, cars cut by the frame); some of the coarser ones are shrunk onto such a photo instead (small cars
far off, with open ground around them). Which photos and which grid a step gets comes from (seed, epoch, step)
alone: a resumed run sees the very same images. The held-out photos (a fixed share, by seed) make the validation
mosaics that AP50 is measured on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from ..dataset.images import ImageError, open_image
from ..dataset.index import index_dataset
from ..dataset.scenes import MIN_VISIBLE, shares_in_view  # a car less than half in view is no car to find
from .model import INPUT_SIZE

MOSAIC_GRIDS = (1, 2, 2, 3, 3, 4, 4, 5, 6)
WINDOWS = 0.5           # share of mosaics of which a random window is kept (cars cut by its frame, larger cars)
ZOOM_OUT = 0.4          # share of the coarser mosaics (ZOOM_GRIDS) shrunk onto a photo without a car (smaller cars,
ZOOM_GRIDS = 3          # with room around them); a finer grid's cars are small enough already
NEGATIVE_CELLS = 0.25   # share of mosaic cells that get a photo without a car (the detector's outlier exposure)
PASTED = 0.5            # share of those that get cars (their box's contents) pasted on, at any size and place,
PASTE_MOST = 3          # up to this many, one in front of another
RECOLOURED = 0.5        # share of cells whose colours are shifted (hue, saturation, brightness; some grey)
VAL_MOSAICS = 60
_TAG = 0x646574  # "det": keeps these draws apart from the classifier's


@dataclass
class BoxedPhoto:
    path: str                                   # absolute
    box: tuple[float, float, float, float] | None  # x1, y1, x2, y2 in its pixels, 0-based, x2/y2 exclusive;
                                                   # None: a photo without a car


def boxed_photos(root: str, fmt: str = "auto") -> list[BoxedPhoto]:
    """Every photo of the dataset that has a car box; a dataset without boxes is refused with what it needs."""
    index = index_dataset(root, fmt)
    photos = [BoxedPhoto(os.path.join(index.root, p), (b[0] - 1.0, b[1] - 1.0, float(b[2]), float(b[3])))
              for p, b in zip(index.paths, index.bboxes) if b]  # CompCars boxes: 1-based, inclusive
    if not photos:
        raise ValueError(f"{root} ({index.format} format) has no car boxes: a detector trains on a dataset whose "
                         f"photos come with boxes (CompCars label files, the demo set); a folder of classes has none")
    return photos


def split_photos(photos: list[BoxedPhoto], val_frac: float, seed: int) -> tuple[list[BoxedPhoto], list[BoxedPhoto]]:
    if len(photos) < 2:
        raise ValueError(f"a detector needs at least 2 photos with boxes (one to hold out), not {len(photos)}")
    order = np.random.default_rng([seed, _TAG]).permutation(len(photos))
    n_val = min(len(photos) - 1, max(1, round(len(photos) * val_frac)))
    return [photos[i] for i in order[n_val:]], [photos[i] for i in order[:n_val]]


def mosaic(photos: list[BoxedPhoto], rng: np.random.Generator, size=INPUT_SIZE,
           negatives: list[str] = ()) -> tuple[torch.Tensor, dict]:
    """One training image (float CHW in [0, 1]) and its target {"boxes": (N, 4), "labels": (N,)}; with
    `negatives` (paths of photos without a car), about NEGATIVE_CELLS of the cells show one of them instead."""
    width, height = size
    k = int(rng.choice(MOSAIC_GRIDS))
    canvas = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    boxes = []
    cell_w, cell_h = width / k, height / k
    for row in range(k):
        for col in range(k):
            photo = photos[int(rng.integers(len(photos)))]
            if negatives and rng.random() < NEGATIVE_CELLS:
                photo = BoxedPhoto(negatives[int(rng.integers(len(negatives)))], None)
            try:
                image = open_image(photo.path)
            except (ImageError, OSError):
                continue  # an unreadable photo leaves its cell empty
            w, h = max(1, round(cell_w)), max(1, round(cell_h))
            left, top = round(col * cell_w), round(row * cell_h)
            flip = rng.random() < 0.5
            scaled = image.resize((w, h), Image.BILINEAR)
            if photo.box is None:
                pasted = _paste_cars(scaled, photos, rng) if rng.random() < PASTED else []
                canvas.paste(_recolour(scaled, rng), (left, top))
                boxes += [[left + x1, top + y1, left + x2, top + y2] for x1, y1, x2, y2 in pasted]
                continue
            canvas.paste(_recolour(scaled.transpose(Image.FLIP_LEFT_RIGHT) if flip else scaled, rng), (left, top))
            x1, y1, x2, y2 = photo.box
            sx, sy = w / image.width, h / image.height
            if flip:
                x1, x2 = image.width - x2, image.width - x1
            boxes.append([left + x1 * sx, top + y1 * sy, left + x2 * sx, top + y2 * sy])
    boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    reframe = rng.random()
    if reframe < WINDOWS:
        canvas, boxes = _window(canvas, boxes, rng)
    elif k <= ZOOM_GRIDS and reframe < WINDOWS + ZOOM_OUT:
        canvas, boxes = _zoom_out(canvas, boxes, rng, negatives)
    target = {"boxes": torch.from_numpy(boxes), "labels": torch.ones(len(boxes), dtype=torch.int64)}
    return TF.to_dtype(TF.to_image(canvas), torch.float32, scale=True), target


def _paste_cars(cell: Image.Image, photos: list[BoxedPhoto], rng: np.random.Generator) -> list[list[float]]:
    """Paste 1-3 cars (the contents of their boxes) onto a cell without one, in place: cars on backgrounds their
    photos never had, at sizes and places of their own, so a car is its shape, not its road. A later car is in front
    of an earlier one; a car left less than MIN_VISIBLE in view is no car to find (as scenes label them), one half
    hidden keeps its whole box. Returns the boxes of the cars in view."""
    boxes = []
    for _ in range(int(rng.integers(1, PASTE_MOST + 1))):
        photo = photos[int(rng.integers(len(photos)))]
        try:
            car = open_image(photo.path).crop(tuple(round(v) for v in photo.box))
        except (ImageError, OSError):
            continue
        w = rng.uniform(0.25, 0.8) * cell.width
        h = min(w * car.height / max(car.width, 1), 0.9 * cell.height)
        w = h * car.width / max(car.height, 1)
        if w < 2 or h < 2:
            continue
        x, y = round(rng.uniform(0, cell.width - w)), round(rng.uniform(0, cell.height - h))
        w, h = max(1, round(w)), max(1, round(h))
        cell.paste(car.resize((w, h), Image.BILINEAR), (x, y))
        boxes.append([x, y, x + w, y + h])
    layers = [(np.ones((y2 - y1, x2 - x1), dtype=bool), x1, y1) for x1, y1, x2, y2 in boxes]
    return [box for box, seen in zip(boxes, shares_in_view(layers, cell.width, cell.height)) if seen >= MIN_VISIBLE]


def _recolour(cell: Image.Image, rng: np.random.Generator) -> Image.Image:
    """About RECOLOURED of the cells with their hue, saturation and brightness shifted (one in five grey): a car is
    not its paint, nor a background its colours."""
    if rng.random() >= RECOLOURED:
        return cell
    if rng.random() < 0.2:
        return TF.rgb_to_grayscale(cell, num_output_channels=3)
    cell = TF.adjust_hue(cell, float(rng.uniform(-0.5, 0.5)))
    cell = TF.adjust_saturation(cell, float(rng.uniform(0.5, 1.5)))
    return TF.adjust_brightness(cell, float(rng.uniform(0.7, 1.3)))


def _window(canvas: Image.Image, boxes: np.ndarray, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """A random window of 55-100% of the mosaic, enlarged back to its size: cars cut by the frame, cars larger
    than a photo cell; boxes clipped to it, and those less than MIN_VISIBLE inside dropped."""
    share = rng.uniform(0.55, 1.0)
    w, h = canvas.width * share, canvas.height * share
    x0, y0 = rng.uniform(0, canvas.width - w), rng.uniform(0, canvas.height - h)
    clipped = np.clip(boxes, [x0, y0, x0, y0], [x0 + w, y0 + h, x0 + w, y0 + h])
    area = lambda b: np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # noqa: E731
    keep = area(clipped) >= MIN_VISIBLE * np.maximum(area(boxes), 1e-9)
    scale = canvas.width / w
    moved = (clipped[keep] - [x0, y0, x0, y0]) * scale
    window = canvas.resize(canvas.size, Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
    return window, _labelled(moved)


def _zoom_out(canvas: Image.Image, boxes: np.ndarray, rng: np.random.Generator,
              negatives: list[str]) -> tuple[Image.Image, np.ndarray]:
    """The mosaic shrunk to 30-80% of its size at a random place on a photo without a car (or a plain colour): the
    smallest cars a mosaic's grid makes, smaller still, and cars with open ground around them rather than a cell's
    frame -- the cars a street photo shows far away."""
    share = rng.uniform(0.3, 0.8)
    w, h = max(1, round(canvas.width * share)), max(1, round(canvas.height * share))
    x0, y0 = int(rng.integers(0, canvas.width - w + 1)), int(rng.integers(0, canvas.height - h + 1))
    backdrop = Image.new("RGB", canvas.size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    if negatives:
        try:
            backdrop = _recolour(open_image(negatives[int(rng.integers(len(negatives)))]).resize(canvas.size,
                                                                                                  Image.BILINEAR), rng)
        except (ImageError, OSError):
            pass  # an unreadable photo: the plain colour
    backdrop.paste(canvas.resize((w, h), Image.BILINEAR), (x0, y0))
    scale = np.array([w / canvas.width, h / canvas.height] * 2, dtype=np.float32)
    return backdrop, _labelled(boxes * scale + np.array([x0, y0, x0, y0], dtype=np.float32))


def _labelled(boxes: np.ndarray) -> np.ndarray:
    """The boxes still worth a label after a mosaic is reframed: at least 2 px each way (float32)."""
    return boxes[(boxes[:, 2] - boxes[:, 0] >= 2) & (boxes[:, 3] - boxes[:, 1] >= 2)].astype(np.float32)


def training_batch(photos: list[BoxedPhoto], batch_size: int, seed: int, epoch: int, step: int,
                   negatives: list[str] = ()):
    rng = np.random.default_rng([seed, _TAG, epoch, step])
    images, targets = zip(*(mosaic(photos, rng, negatives=negatives) for _ in range(batch_size)))
    return list(images), list(targets)


def validation_set(photos: list[BoxedPhoto], seed: int, count: int = VAL_MOSAICS, negatives: list[str] = ()):
    """The same mosaics of the held-out photos (and negatives) at every epoch, and on every resume."""
    rng = np.random.default_rng([seed, _TAG, "val".encode()[0]])
    return [mosaic(photos, rng, negatives=negatives) for _ in range(count)]


def negative_paths(spec: str) -> list[str]:
    """The photos without a car a --negatives value names (dataset.negatives: a folder, or `generated`)."""
    if not spec:
        return []
    from ..dataset.negatives import negative_photos
    folder, paths = negative_photos(spec)
    return [os.path.join(folder, p) for p in paths]
