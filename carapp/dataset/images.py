"""Opening photos: one place that turns any file into an RGB PIL image, or raises ImageError with a clear reason."""
from __future__ import annotations

import os
import warnings
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}  # what counts as a photo


def is_image(name: str) -> bool:
    """A photo by its file name's extension (datasets, collections, uploads alike)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS

# Refuse decompression bombs with our own message (PIL only warns between 1x and 2x its limit).
MAX_PIXELS = 80_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
MAX_SIDE = 4096  # larger photos are reduced after decoding: nothing downstream needs more
PHOTO_DRAFT_SIZE = 1024  # photos to predict decode at >= this size: a 48-megapixel JPEG at a fraction of the cost


class ImageError(ValueError):
    """A file that is not a usable photo; `reason` names the problem, the message adds the file's name."""

    def __init__(self, name, reason: str):
        super().__init__(f"{name}: {reason}")
        self.reason = reason


def open_image(source: str | os.PathLike | BinaryIO, bbox: list[int] | None = None,
               draft_size: int | None = None) -> Image.Image:
    """Decode `source` to RGB with EXIF orientation applied, optionally cropped to a 1-based x1 y1 x2 y2 box.

    `draft_size` lets JPEG decoding skip detail at decode time (PIL draft mode) when the target is much smaller.
    """
    name = getattr(source, "name", source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
        full_size = img.size
        if draft_size and img.format == "JPEG":
            # draft picks a scale >= the requested size, so the result never drops below draft_size
            img.draft("RGB", (draft_size, draft_size))
        img = _reduce(img, draft_size)
        ImageOps.exif_transpose(img, in_place=True)  # in place: no full-size copy when nothing needs turning
        img = _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(name, f"image too large to decode safely (over {MAX_PIXELS:,} pixels)") from None
    except UnidentifiedImageError:
        if isinstance(source, (str, os.PathLike)) and os.path.getsize(source) == 0:  # only on failure: no hot-path stat
            raise ImageError(name, "empty file (0 bytes)") from None
        raise ImageError(name, "not an image file (or a format Pillow cannot read)") from None
    except FileNotFoundError:
        raise ImageError(name, "file not found") from None
    except IsADirectoryError:
        raise ImageError(name, "a folder, not an image file") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(name, f"damaged or truncated image ({exc})") from None
    if min(img.size) < 1:
        raise ImageError(name, "image has no pixels")
    if bbox is not None:
        img = _crop(img, bbox, scale=img.size[0] / full_size[0] if full_size[0] else 1.0)
    if max(img.size) > MAX_SIDE:
        img.thumbnail((MAX_SIDE, MAX_SIDE), Image.BILINEAR)
    return img


def _reduce(img: Image.Image, draft_size: int | None) -> Image.Image:
    """Shrink a large non-JPEG by an integer factor right after decoding, before any mode conversion: an
    8,900 x 8,900 RGBA PNG then costs its decoded size once instead of three converted copies of it."""
    factor = min(img.size) // draft_size if draft_size else 1  # like draft: never below draft_size
    if factor < 2:
        return img
    if img.mode in ("P", "1"):  # palette and bilevel images: nearest keeps the palette, at a quarter the memory
        return img.resize((max(1, img.width // factor), max(1, img.height // factor)), Image.NEAREST)
    if img.mode not in ("RGB", "RGBA", "L", "LA", "PA", "CMYK", "I", "F"):
        return img
    # in bands: reduce() premultiplies alpha through a converted copy, which must not be one of the whole image
    out = Image.new(img.mode, (img.width // factor, img.height // factor))
    out.info = dict(img.info)  # EXIF orientation is applied after this
    band = factor * 128
    for top in range(0, out.height * factor, band):
        piece = img.crop((0, top, out.width * factor, min(top + band, out.height * factor)))
        out.paste(piece.reduce(factor), (0, top // factor))
    return out


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        img.load()
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits first
        img = img.point(lambda v: v / 256).convert("L")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def _crop(img: Image.Image, bbox: list[int], scale: float) -> Image.Image:
    x1, y1, x2, y2 = [v * scale for v in bbox]
    box = (max(0, int(x1 - scale)), max(0, int(y1 - scale)), min(img.width, int(x2)), min(img.height, int(y2)))
    if box[2] - box[0] < 2 or box[3] - box[1] < 2:
        return img  # a degenerate box is a label slip, not a reason to lose the image
    return img.crop(box)


def find_unreadable(index) -> list[str]:
    """Paths (relative to the dataset root) of images that training would skip: open_image is the one judge."""
    bad = []
    for rel in index.paths:
        try:
            open_image(os.path.join(index.root, rel))
        except ImageError:
            bad.append(rel)
    return bad


def sample_sizes(root: str, paths: list[str], n: int = 300, seed: int = 0) -> list[tuple[int, int]]:
    """(width, height) of up to n images, read from the headers only: quick even on full-size photos."""
    import random
    sizes = []
    for rel in random.Random(seed).sample(paths, min(n, len(paths))):
        try:
            with Image.open(os.path.join(root, rel)) as img:
                sizes.append(img.size)
        except Exception:  # an unreadable file has no size; stats --verify reports it
            continue
    return sizes
