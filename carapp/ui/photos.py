"""Photos for the galleries: open what still opens (a gallery skips a vanished or broken file), as thumbnails."""
from __future__ import annotations

import os

from ..dataset.images import ImageError, open_image

SIX_WIDE = ["six-wide"]  # the CSS class (assets/style.css) that keeps a gallery at six columns with one photo


def thumbnails(root: str, paths, limit: int, size: int = 256) -> list[tuple]:
    """(thumbnail, path) for the first `limit` paths (relative to root) whose file opens."""
    out = []
    for rel in paths:
        try:
            img = open_image(os.path.join(root, rel))
        except (ImageError, OSError):
            continue
        img.thumbnail((size, size))
        out.append((img, rel))
        if len(out) >= limit:
            break
    return out
