"""SYNTHETIC multi-car scenes with their true boxes: several demo cars, at varied sizes and places, in one photo.

    python -m carapp demo-data --out data/demo --scenes 200

writes, beside the demo dataset, out/scenes/<k>.jpg and out/scenes/scenes.json:
    [{"image": "0000.jpg", "width": 320, "height": 240,
      "cars": [{"box": [x1, y1, x2, y2], "class": "Aurora Sprint", "make": "Aurora"}, ...]}, ...]
Boxes are in pixels of the photo, x2/y2 exclusive (torchvision's convention), clipped to the frame: a car cut by the
frame has the box of what shows. 0-4 cars a scene (SCENE_CARS: about one scene in ten has none), each 12-60% of the
photo's width, drawn far to near (a nearer car hides part of a farther one; its box stays the whole car's), some cut
by the frame. The cars are the demo's own drawings (carapp.dataset.demo), so a demo classifier knows them; the
backdrop is the demo's road scene at the photo's size. Class names are those the demo dataset's index gives.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..atomic import atomic_writer
from .demo import (_MAKE_BY_ID, _VIEW_CHOICES, _VIEW_PROBS, JPEG_QUALITY, MODELS, SS, _draw_background,
                   _render_car)

SCENE_SIZE = (320, 240)
SCENE_CARS = (0, 1, 1, 2, 2, 2, 3, 3, 4, 4)  # how many cars a scene holds: drawn uniformly from this list
SCENES_FILE = "scenes.json"
_SCENE_TAG = 0x7363656E  # "scen": keeps these draws apart from the demo photos'


def class_name(model) -> str:
    """The class name the demo dataset's index gives a model (an empty model name reads "model <id>")."""
    return f"{_MAKE_BY_ID[model.make_id].name} {model.name or f'model {model.id}'}"


def _car_sprite(model, rng) -> Image.Image:
    """One demo car, cut out: an RGBA image at twice the final resolution, tight around the car."""
    view = int(rng.choice(_VIEW_CHOICES, p=_VIEW_PROBS))
    layer, _ = _render_car(model, view, rng)
    return layer.crop(layer.getchannel("A").point(lambda a: 255 if a >= 64 else 0).getbbox())


def _scene(rng, size: tuple[int, int]) -> tuple[Image.Image, list[dict]]:
    width, height = size
    backdrop = _draw_background(rng, width * SS, height * SS)
    count = int(rng.choice(SCENE_CARS))
    placed = []
    for _ in range(count):
        model = MODELS[int(rng.integers(len(MODELS)))]
        sprite = _car_sprite(model, rng)
        w = rng.uniform(0.12, 0.6) * width * SS
        h = w * sprite.height / sprite.width
        x = rng.uniform(-0.25 * w, width * SS - 0.75 * w)            # up to a quarter cut by either side
        ground = rng.uniform(0.55 * height * SS + h * 0.3, height * SS + 0.15 * h)  # bottom may leave the frame
        placed.append((ground, model, sprite.resize((max(1, round(w)), max(1, round(h))), Image.LANCZOS), x))
    cars = []
    canvas = backdrop.convert("RGBA")
    for ground, model, sprite, x in sorted(placed, key=lambda p: p[0]):  # far (higher up) first
        top = ground - sprite.height
        ImageDraw.Draw(canvas).ellipse([x, ground - 5, x + sprite.width, ground + 5], fill=(35, 35, 38, 255))
        canvas.paste(sprite, (round(x), round(top)), sprite)  # its own alpha as the mask: may start off the frame
        box = [max(0.0, x / SS), max(0.0, top / SS), min(width, (x + sprite.width) / SS),
               min(height, ground / SS)]
        if box[2] - box[0] >= 2 and box[3] - box[1] >= 2:
            cars.append({"box": [round(v, 1) for v in box], "class": class_name(model),
                         "make": _MAKE_BY_ID[model.make_id].name})
    photo = canvas.convert("RGB").reduce(SS)
    arr = np.asarray(photo, float) * rng.uniform(0.85, 1.15) + rng.normal(0, rng.uniform(2, 8), (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"), cars


def make_demo_scenes(out: str | os.PathLike, count: int, seed: int = 0,
                     size: tuple[int, int] = SCENE_SIZE) -> list[dict]:
    """Write `count` scenes into out/ (out/<k:04d>.jpg and out/scenes.json, written last); returns the records."""
    if count < 0:
        raise ValueError(f"--scenes must be 0 or more, not {count}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for k in range(count):
        rng = np.random.default_rng([seed, _SCENE_TAG, k])  # one generator per scene: scene k is the same at any count
        photo, cars = _scene(rng, size)
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
