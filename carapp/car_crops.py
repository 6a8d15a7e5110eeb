"""The crop a classifier gets for a detected car: what its training photos looked like around their cars.

A `--crop-bbox` run trained on the labelled box itself: it gets the box. A whole-photo run trained on photos with
context around the car (a CompCars web photo: the car fills most of it, some road and sky around): it gets the box
widened to that context, measured on its own training photos and recorded in calibration.json (`car_crop`):
the photo's size over the box's, and where the box sits in it, as medians. A crop that runs past the photo's edge
is filled with the photo's mean colour (the classifier's letterbox fill would be another look it never saw).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageStat

BOX = {"kind": "box"}
# For a whole-photo run calibrated before car_crop was recorded: about a CompCars photo's context
DEFAULT_CONTEXT = {"kind": "context", "width": 1.4, "height": 1.5, "dx": 0.0, "dy": -0.1}


def measure_context(sizes: list[tuple[int, int]], boxes: list[list[float]]) -> dict:
    """The median context of training photos around their boxes (0-based x1, y1, x2, y2 in the photo's pixels)."""
    rows = []
    for (width, height), (x1, y1, x2, y2) in zip(sizes, boxes):
        bw, bh = x2 - x1, y2 - y1
        if bw >= 2 and bh >= 2:
            rows.append((width / bw, height / bh, (width / 2 - (x1 + x2) / 2) / bw, (height / 2 - (y1 + y2) / 2) / bh))
    if not rows:
        return dict(DEFAULT_CONTEXT)
    width, height, dx, dy = np.median(np.array(rows), axis=0)
    return {"kind": "context", "width": round(float(width), 4), "height": round(float(height), 4),
            "dx": round(float(dx), 4), "dy": round(float(dy), 4), "photos": len(rows)}


def crop_region(box: list[float], rule: dict) -> tuple[float, float, float, float]:
    """The region of the photo (x1, y1, x2, y2; may run past its edges) the classifier sees for this car."""
    x1, y1, x2, y2 = box
    if rule.get("kind") != "context":
        return x1, y1, x2, y2
    bw, bh = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2 + rule["dx"] * bw, (y1 + y2) / 2 + rule["dy"] * bh
    w, h = bw * rule["width"], bh * rule["height"]
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def min_box_side(rule: dict, input_size: int) -> int:
    """The shortest box side a car is named at: its crop (the box, or the box with its context) must not be
    enlarged more than twice to the model's input (CarNET refuses boxes under 180 px for its 224-px models). With a
    context rule the crop is larger than the box, so a smaller box will do: 21 px for the demo's 64-px model."""
    grows = min(rule.get("width", 1.0), rule.get("height", 1.0)) if rule.get("kind") == "context" else 1.0
    return max(16, round(input_size / 2 / max(grows, 1.0)))


def mark_small(answer, short_side: float, min_box: int) -> None:
    """A car whose box's shorter side is under min_box is `small`, not named, and says why (an Answer or a
    Prediction: anything with status and reason)."""
    if short_side < min_box:
        answer.status = "small"
        answer.reason = (f"Too small to name: its box's shorter side is {short_side:.0f} px, under the {min_box} px "
                         f"this model needs.")


def car_crop(photo: Image.Image, box: list[float], rule: dict) -> Image.Image:
    """The car's crop, the part beyond the photo filled with its mean colour."""
    x1, y1, x2, y2 = (round(v) for v in crop_region(box, rule))
    x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
    inside = (max(0, x1), max(0, y1), min(photo.width, x2), min(photo.height, y2))
    if inside == (x1, y1, x2, y2):
        return photo.crop(inside)
    rgb = photo if photo.mode == "RGB" else photo.convert("RGB")
    fill = tuple(int(c) for c in ImageStat.Stat(rgb).mean)  # from its histogram: 5x faster than numpy's mean
    canvas = Image.new("RGB", (x2 - x1, y2 - y1), fill)
    if inside[2] > inside[0] and inside[3] > inside[1]:
        canvas.paste(photo.crop(inside), (inside[0] - x1, inside[1] - y1))
    return canvas
