"""Strange and broken images: a prediction or a message that names the problem, never a traceback; the app stays up."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_cli, serving
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from carapp.dataset.images import ImageError, open_image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def make_bomb(path: Path, side: int = 30_000) -> None:
    """A few hundred bytes that claim 900 megapixels: PIL must refuse it before decoding."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + _png_chunk(b"IEND", b""))


def photo(size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory) -> dict[str, tuple[Path, str | tuple[int, int]]]:
    """name -> (file, expected size after opening, or the words of the error)."""
    d = tmp_path_factory.mktemp("odd")
    files: dict[str, tuple[Path, object]] = {}

    def add(name, expect, writer):
        writer(d / name)
        files[name] = (d / name, expect)

    buf = io.BytesIO()
    photo((200, 150)).save(buf, "JPEG")
    add("truncated.jpg", "damaged or truncated", lambda p: p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2]))
    add("notes.jpg", "not an image file", lambda p: p.write_text("shopping list: tyres, wipers"))
    add("empty.jpg", "empty file", lambda p: p.write_bytes(b""))
    add("bomb.png", "too large to decode safely", make_bomb)
    add("one_pixel.png", (1, 1), lambda p: Image.new("RGB", (1, 1), (9, 9, 9)).save(p))
    add("grey16.png", (64, 48), lambda p: Image.fromarray(
        (np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)).save(p))
    add("cmyk.jpg", (64, 48), lambda p: Image.new("CMYK", (64, 48), (0, 200, 200, 0)).save(p, "JPEG"))
    add("rgba.png", (64, 48), lambda p: photo((64, 48)).convert("RGBA").save(p))
    add("palette.png", (64, 48), lambda p: photo((64, 48)).convert("P").save(p))
    add("grey_alpha.png", (64, 48), lambda p: photo((64, 48)).convert("LA").save(p))
    frames = [Image.new("RGB", (64, 48), c) for c in ((200, 0, 0), (0, 0, 200))]
    add("animated.gif", (64, 48), lambda p: frames[0].save(p, save_all=True, append_images=frames[1:]))
    add("animated.webp", (64, 48), lambda p: frames[0].save(p, save_all=True, append_images=frames[1:]))

    def rotated(p):
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90° clockwise when shown
        photo((80, 40)).save(p, "JPEG", exif=exif)
    add("exif_rotated.jpg", (40, 80), rotated)
    add("huge.jpg", (4096, 3072), lambda p: Image.new("RGB", (8000, 6000), (30, 90, 160)).save(p, "JPEG"))
    return files


def test_open_image_on_every_odd_file(odd_files):
    for name, (path, expect) in odd_files.items():
        if isinstance(expect, tuple):
            img = open_image(path)
            assert img.mode == "RGB" and img.size == expect, name
        else:
            with pytest.raises(ImageError, match=expect):
                open_image(path)
    first = open_image(odd_files["animated.gif"][0])
    assert first.getpixel((5, 5)) == (200, 0, 0)  # the first frame


@pytest.mark.slow
def test_cli_predict_reports_each_bad_file_and_goes_on(odd_files, tiny_run):
    paths = [str(p) for p, _ in odd_files.values()]
    proc = run_cli("predict", *paths, "--run", tiny_run, "--json", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    import json
    entries = {Path(e["image"]).name: e for e in json.loads(proc.stdout)}
    for name, (_, expect) in odd_files.items():
        if isinstance(expect, tuple):
            assert len(entries[name]["top"]) == 5, name
        else:
            assert expect in entries[name]["error"], name


@pytest.fixture(scope="module")
def app(demo_root, tiny_run, tmp_path_factory):
    runs = tmp_path_factory.mktemp("hard-runs")
    with serving(demo_root, tiny_run, runs) as url:
        yield url


@pytest.mark.slow
def test_uploads_through_the_app(app, odd_files, tmp_path):
    client = Client(app, verbose=False, analytics_enabled=False)
    for name, (path, expect) in odd_files.items():
        if isinstance(expect, tuple):
            label, heat, *_ = client.predict(handle_file(str(path)), api_name="/predict")
            assert len(label["confidences"]) == 5 and max(Image.open(heat).size) >= 256, name
        else:
            with pytest.raises(AppError) as err:
                client.predict(handle_file(str(path)), api_name="/predict")
            assert f"{name}: " in str(err.value) and expect in str(err.value), name
            assert "Traceback" not in str(err.value) and "/tmp/" not in str(err.value)
    big = tmp_path / "eleven_megabytes.jpg"
    big.write_bytes(b"\xff" * (11 * 2**20))
    with pytest.raises(Exception, match="maximum file size"):
        client.predict(handle_file(str(big)), api_name="/predict")
    label, *_ = client.predict(handle_file(str(ROOT / "assets/examples/aurora_sprint.jpg")), api_name="/predict")
    assert label["confidences"]  # still serving
