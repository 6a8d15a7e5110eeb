"""A photo collection to analyse: the images behind folders, zip files and lists, each with its group.

A SOURCE is a folder (walked recursively), a .zip (read in place, never extracted), or a text/CSV file listing image
paths (CSV with a `path` column and optionally `group` and `time`, ISO 8601 or EXIF's form). The group of an image is its first-level sub-folder under
the folder (in a zip: its top-level folder), the list's `group` column, or what a `path,group` CSV given as
--group-by says. Files that are not images by their extension are skipped and counted.
"""
from __future__ import annotations

import csv
import io
import os
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from ..dataset.images import is_image
from .trends import normal_time

ROOT_GROUP = "(top level)"      # images directly in a source folder, not in a sub-folder
ALL_GROUPS = "(all)"
MAX_MEMBER_BYTES = 64 * 2**20   # an image in a zip larger than this when unpacked is refused as a bomb
MAX_RATIO = 200                 # ... as is one that unpacks to more than 200x its packed size
# What reading one photo can raise, a zip member's included: a vanished file, a wrong CRC-32, a garbled deflate
# stream, headers that lie about sizes, an encrypted or unknown compression method. Each makes that photo
# unreadable, never the job's end (an uncaught one in a loader worker ended the whole analysis).
READ_ERRORS = (OSError, KeyError, ValueError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile,
               zlib.error)


class CollectionError(ValueError):
    """A source that cannot be analysed; the message says why."""


@dataclass(frozen=True)
class Item:
    path: str                   # what predictions.csv shows: the file path, or "archive.zip!member"
    group: str
    archive: str | None = None  # the zip file, when the image is a member of one
    member: str | None = None
    time: str = ""              # when the photo was taken (ISO 8601), from a list's time column; "" when unknown

    def open(self, archives: dict) -> io.BytesIO | str:
        """The file to decode: its path, or the member's bytes (the zip opened once per process, in `archives`)."""
        if self.archive is None:
            return self.path
        if self.archive not in archives:
            archives[self.archive] = zipfile.ZipFile(self.archive)
        return io.BytesIO(archives[self.archive].read(self.member))


def collect(sources: list[str], group_by: str = "folder") -> tuple[list[Item], int]:
    """(images in a stable order, each once, number of files skipped as not images). group_by: folder | none | a
    CSV file. A photo two sources name (a folder and a list of it) is the first source's."""
    items, skipped = {}, 0
    for source in sources:
        found, not_images = _items_of(Path(source))
        for item in found:
            items.setdefault(item.path, item)
        skipped += not_images
    items = list(items.values())
    if group_by == "none":
        items = [replace(i, group=ALL_GROUPS) for i in items]
    elif group_by != "folder":
        groups = _group_map(Path(group_by))
        items = [replace(i, group=groups.get(i.path, groups.get(os.path.abspath(i.path), ROOT_GROUP)))
                 for i in items]
    return items, skipped


def _items_of(source: Path) -> tuple[list[Item], int]:
    if source.is_dir():
        return _folder(source)
    if not source.is_file():
        raise CollectionError(f"{source}: no such folder or file")
    if zipfile.is_zipfile(source):
        return _zip(source)
    if source.suffix.lower() in (".txt", ".csv", ".lst", ".list"):
        return _listed(source)
    if is_image(source.name):
        return [Item(str(source), ROOT_GROUP)], 0
    raise CollectionError(f"{source}: not a folder, a .zip, a list of paths (.txt/.csv) or an image")


def _folder(root: Path) -> tuple[list[Item], int]:
    items, skipped = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        group = rel.parts[0] if rel.parts else ROOT_GROUP
        for name in sorted(filenames):
            if is_image(name):
                items.append(Item(os.path.join(dirpath, name), group))
            else:
                skipped += 1
    return items, skipped


def _zip(path: Path) -> tuple[list[Item], int]:
    """Members of a zip, checked before anything is read: no absolute or ../ paths, no bombs."""
    items, skipped = [], 0
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:  # passes is_zipfile, yet its directory is broken
        raise CollectionError(f"{path.name}: not a readable zip ({exc})") from None
    with archive:
        for info in archive.infolist():
            name = PurePosixPath(info.filename)
            if info.filename.startswith(("/", "\\")) or ".." in name.parts or ":" in info.filename.split("/")[0]:
                raise CollectionError(f"{path.name}: refused, member {info.filename!r} points outside the archive")
            if info.is_dir():
                continue
            if info.file_size > MAX_MEMBER_BYTES or info.file_size > MAX_RATIO * max(info.compress_size, 1):
                raise CollectionError(f"{path.name}: refused, member {info.filename!r} unpacks to "
                                      f"{info.file_size:,} bytes (a zip bomb?)")
            if not is_image(info.filename):
                skipped += 1
                continue
            group = name.parts[0] if len(name.parts) > 1 else ROOT_GROUP
            items.append(Item(f"{path}!{info.filename}", group, str(path), info.filename))
    return items, skipped


def _listed(path: Path) -> tuple[list[Item], int]:
    """A text file with one path per line, or a CSV with a `path` column (and `group`, `time`); relative paths are
    taken from the list's folder."""
    text = path.read_text(errors="replace")
    first = text.splitlines()[0].strip().lower() if text.strip() else ""
    if "path" in [c.strip() for c in first.split(",")]:
        rows = [(r.get("path", "").strip(), (r.get("group") or "").strip() or ROOT_GROUP, normal_time(r.get("time")))
                for r in csv.DictReader(io.StringIO(text))]
    else:
        rows = [(line.strip(), ROOT_GROUP, "") for line in text.splitlines() if line.strip()]
    items, skipped = [], 0
    for name, group, time in rows:
        if not is_image(name):
            skipped += 1
            continue
        full = name if os.path.isabs(name) else os.path.join(path.parent, name)
        items.append(Item(full, group, time=time))
    return items, skipped


def _group_map(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise CollectionError(f"--group-by must be folder, none, or a CSV file with path,group columns: {path} "
                              f"is none of these")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "group"} <= set(rows[0]):
        raise CollectionError(f"{path}: a group CSV needs the columns path,group")
    return {r["path"]: r["group"] for r in rows}


def item_of(path: str) -> Item:
    """The Item behind a predictions.csv path ("archive.zip!member" for a zip member)."""
    cut = path.find("!")
    while cut >= 0:  # the first "!" after which the path is a member: either name may hold a "!" of its own
        if os.path.isfile(path[:cut]) and zipfile.is_zipfile(path[:cut]):
            return Item(path, ROOT_GROUP, path[:cut], path[cut + 1:])
        cut = path.find("!", cut + 1)
    return Item(path, ROOT_GROUP)
