"""SYNTHETIC multi-car scenes with their true boxes: several demo cars, at varied sizes and places, in one photo.

    python -m carapp demo-data --out data/demo --scenes 200

writes, beside the demo dataset, out/scenes/<k>.jpg and out/scenes/scenes.json:
    [{"image": "0000.jpg", "width": 320, "height": 240,
      "cars": [{"box": [x1, y1, x2, y2], "class": "Aurora Sprint", "make": "Aurora"}, ...]}, ...]
Boxes are in pixels of the photo, x2/y2 exclusive (torchvision's convention), clipped to the frame: a car cut by the
frame has the box of what shows. 0-4 cars a scene (SCENE_CARS: about one scene in ten has none), each 12-60% of the
photo's width, drawn far to near (a nearer car hides part of a farther one; its box stays the whole car's; a car less
than half in view is left out), some cut by the frame. The cars are the demo's own drawings (carapp.dataset.demo),
so a demo classifier knows them; the backdrop is the demo's road scene at the photo's size. Class names are those
the demo dataset's index gives.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..atomic import atomic_writer
from .demo import (_MAKE_BY_ID, _NO_CAR_PAINTERS, _VIEW_CHOICES, _VIEW_PROBS, JPEG_QUALITY, MODELS, SS,
                   _draw_background, _photo_finish, _render_car)

SCENE_SIZE = (320, 240)
SCENE_CARS = (0, 1, 1, 2, 2, 2, 3, 3, 4, 4)  # how many cars a scene holds: drawn uniformly from this list
SCENES_FILE = "scenes.json"
SCENE_WIDTHS = {"road": (0.12, 0.6), "other": (0.08, 0.7)}  # a car's width, as a share of the photo's
# backdrops of the "other" style: kinds no carapp training sees (outlier exposure and the detector's negatives use
# dataset.negatives.OE_KINDS: scene, leaves, noise, shapes)
OTHER_BACKDROPS = ("fractal", "texture", "gradient")
MIN_VISIBLE = 0.5  # a car less than half in view (behind nearer cars, or out of the frame) is left out
_SCENE_TAG = 0x7363656E  # "scen": keeps these draws apart from the demo photos'


def class_name(model) -> str:
    """The class name the demo dataset's index gives a model (an empty model name reads "model <id>")."""
    return f"{_MAKE_BY_ID[model.make_id].name} {model.name or f'model {model.id}'}"


def _car_sprite(model, rng) -> Image.Image:
    """One demo car, cut out: an RGBA image at twice the final resolution, tight around the car."""
    view = int(rng.choice(_VIEW_CHOICES, p=_VIEW_PROBS))
    layer, _ = _render_car(model, view, rng)
    return layer.crop(layer.getchannel("A").point(lambda a: 255 if a >= 64 else 0).getbbox())


def _backdrop(rng, style: str, width: int, height: int) -> Image.Image:
    if style == "road":
        return _draw_background(rng, width, height)
    kind = str(rng.choice(OTHER_BACKDROPS))
    return _NO_CAR_PAINTERS[kind](rng).resize((width, height), Image.BICUBIC)


def _scene(rng, size: tuple[int, int], style: str = "road") -> tuple[Image.Image, list[dict]]:
    width, height = size
    backdrop = _backdrop(rng, style, width * SS, height * SS)
    count = int(rng.choice(SCENE_CARS))
    low, high = SCENE_WIDTHS[style]
    placed = []
    for _ in range(count):
        model = MODELS[int(rng.integers(len(MODELS)))]
        sprite = _car_sprite(model, rng)
        w = rng.uniform(low, high) * width * SS
        h = w * sprite.height / sprite.width
        x = rng.uniform(-0.25 * w, width * SS - 0.75 * w)            # up to a quarter cut by either side
        lowest = 0.55 * height * SS + h * 0.3 if style == "road" else h * 0.8  # on the road, or anywhere
        ground = rng.uniform(lowest, height * SS + 0.15 * h)  # the bottom may leave the frame
        placed.append((ground, model, sprite.resize((max(1, round(w)), max(1, round(h))), Image.LANCZOS), x))
    placed = _visible(sorted(placed, key=lambda p: p[0]), width * SS, height * SS)  # far (higher up) first
    cars = []
    canvas = backdrop.convert("RGBA")
    for ground, model, sprite, x in placed:
        top = ground - sprite.height
        ImageDraw.Draw(canvas).ellipse([x, ground - 5, x + sprite.width, ground + 5], fill=(35, 35, 38, 255))
        canvas.paste(sprite, (round(x), round(top)), sprite)  # its own alpha as the mask: may start off the frame
        box = [max(0.0, x / SS), max(0.0, top / SS), min(width, (x + sprite.width) / SS),
               min(height, ground / SS)]
        if box[2] - box[0] >= 2 and box[3] - box[1] >= 2:
            cars.append({"box": [round(v, 1) for v in box], "class": class_name(model),
                         "make": _MAKE_BY_ID[model.make_id].name})
    return _photo_finish(canvas.convert("RGB").reduce(SS), rng), cars


def _visible(placed: list, width: int, height: int, share: float = MIN_VISIBLE) -> list:
    """The cars (far to near) of which at least `share` of the drawn pixels stay in view: a car hidden behind nearer
    ones, or mostly outside the frame, is not drawn (no one could label it, nor a detector find it)."""
    layers = [(np.asarray(sprite.getchannel("A")) >= 64, round(x), round(ground - sprite.height))
              for ground, _, sprite, x in placed]
    return [p for p, seen in zip(placed, shares_in_view(layers, width, height)) if seen >= share]


def shares_in_view(layers: list[tuple[np.ndarray, int, int]], width: int, height: int) -> list[float]:
    """For layers drawn far to near onto a width x height frame, each a boolean mask at (left, top) that may run past
    the frame: the share of each one's pixels left in view, inside the frame and not behind a later layer."""
    owner = np.full((height, width), -1, dtype=np.int16)  # which layer each pixel shows, nearest last
    for i, (mask, left, top) in enumerate(layers):
        y0, y1 = max(0, top), min(height, top + mask.shape[0])
        x0, x1 = max(0, left), min(width, left + mask.shape[1])
        if y1 > y0 and x1 > x0:
            owner[y0:y1, x0:x1][mask[y0 - top:y1 - top, x0 - left:x1 - left]] = i
    shown = np.bincount(owner[owner >= 0].ravel(), minlength=len(layers))
    return [seen / max(int(mask.sum()), 1) for seen, (mask, _, _) in zip(shown, layers)]


def make_demo_scenes(out: str | os.PathLike, count: int, seed: int = 0,
                     size: tuple[int, int] = SCENE_SIZE, style: str = "road") -> list[dict]:
    """Write `count` scenes into out/ (out/<k:04d>.jpg and out/scenes.json, written last); returns the records.
    style "other": cars at other sizes (8-70% of the width) anywhere on backdrops the demo never shows and no training
    uses (fractal noise, textures, gradients), for measuring a detector on scenes unlike those it was tuned on."""
    if count < 0:
        raise ValueError(f"--scenes must be 0 or more, not {count}")
    if style not in SCENE_WIDTHS:
        raise ValueError(f"scene style must be one of {', '.join(SCENE_WIDTHS)}, not {style!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for k in range(count):
        rng = np.random.default_rng([seed, _SCENE_TAG, k])  # one generator per scene: scene k is the same at any count
        photo, cars = _scene(rng, size, style)
        name = f"{k:04d}.jpg"
        photo.save(out / name, quality=JPEG_QUALITY)
        records.append({"image": name, "width": size[0], "height": size[1], "cars": cars})
    with atomic_writer(out / SCENES_FILE) as f:
        json.dump(records, f, indent=1)
    return records


def read_scenes(folder: str | os.PathLike) -> list[dict]:
    """The records of a scenes folder (its scenes.json), with a clear message when there is none."""
    path = Path(folder) / SCENES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {SCENES_FILE}: write scenes with `python -m carapp demo-data "
                                f"--out DIR --scenes N`")
    return json.loads(path.read_text())
