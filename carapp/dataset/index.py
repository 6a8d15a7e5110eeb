"""Datasets on disk: format detection, a cached index of the tree, class names, CompCars labels and attributes.

Formats (see DESIGN.md): CompCars web-nature (`data/image/<make>/<model>/<year>/*.jpg` + labels + misc/*.mat),
CompCars surveillance-nature (`sv_data/image/<sv_model>/*.jpg`), Stanford Cars (the devkit layout torchvision's
StanfordCars reads: devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, cars_train/,
cars_test/), and a plain class-per-folder tree. A dataset's own train/test lists (CompCars'
train_test_split/classification/*.txt, sv_data's *_surveillance.txt, Stanford Cars' two annotation files) are read
into `official` (path -> train | test), for `train --split official`.
The index is a JSON file in the user cache, keyed by the root and checked against the mtimes of the image folders,
so a second scan of 136k images only stats a few thousand folders.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_writer
from ..cache import cache_dir
from .images import is_image

log = logging.getLogger(__name__)

INDEX_VERSION = 2  # 2: official train/test lists, Stanford Cars
OFFICIAL_LISTS = {  # format -> split -> the list file, relative to the format's base folder
    "compcars": {"train": "train_test_split/classification/train.txt",
                 "test": "train_test_split/classification/test.txt"},
    "sv": {"train": "train_surveillance.txt", "test": "test_surveillance.txt"},
    "stanford": {"train": "devkit/cars_train_annos.mat", "test": "cars_test_annos_withlabels.mat"},
}
# Stanford Cars class names start with the make; these makes are more than one word
MULTI_WORD_MAKES = ("AM General", "Aston Martin", "Land Rover")
VIEWPOINTS = {-1: "uncertain", 1: "front", 2: "rear", 3: "side", 4: "front-side", 5: "rear-side"}


class DatasetError(ValueError):
    """A dataset folder that cannot be used, with a message meant for the user."""


@dataclass
class DatasetIndex:
    root: str                       # the root as the user gave it; paths are relative to it
    format: str
    paths: list[str]                # posix paths relative to root
    keys: list[str]                 # class key per image (CompCars model id, sv model id, or folder name)
    classes: dict[str, dict]        # key -> {"name", "make", "model"}
    viewpoints: list[int | None] = field(default_factory=list)
    bboxes: list[list[int] | None] = field(default_factory=list)  # x1 y1 x2 y2, 1-based
    attributes: dict[str, dict] = field(default_factory=dict)     # CompCars model id -> attributes
    official: dict[str, str] = field(default_factory=dict)        # path -> train | test, from the dataset's lists
    official_lists: dict[str, dict] = field(default_factory=dict)  # split -> {"file", "listed", "missing" (a few)}

    def without(self, paths) -> "DatasetIndex":
        """The index less the given paths (an exclusion list), classes and attributes unchanged."""
        drop = set(paths)
        keep = [i for i, p in enumerate(self.paths) if p not in drop]
        pick = lambda values: [values[i] for i in keep] if values else values
        return DatasetIndex(self.root, self.format, pick(self.paths), pick(self.keys), self.classes,
                            pick(self.viewpoints), pick(self.bboxes), self.attributes,
                            {p: s for p, s in self.official.items() if p not in drop}, self.official_lists)

    def class_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for k in self.keys:
            counts[k] = counts.get(k, 0) + 1
        return counts


# ----------------------------------------------------------------------------------------------- format detection

def detect_format(root: str | os.PathLike) -> tuple[str, Path]:
    """Return (format, base) where base is the folder holding image/ (CompCars) or the class folders."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    for base in (root / "data", root):
        if (base / "image").is_dir() and ((base / "label").is_dir() or (base / "misc").is_dir()):
            return "compcars", base
    for base in (root / "sv_data", root):
        if (base / "image").is_dir() and (base / "sv_make_model_name.mat").is_file():
            return "sv", base
    if (root / "devkit" / "cars_meta.mat").is_file():
        return "stanford", root
    if any(d.is_dir() and _has_images(d) for d in _subdirs(root)):
        return "folder", root
    raise DatasetError(f"{root} is not a dataset: expected CompCars (data/image/<make>/<model>/<year>/*.jpg), "
                       f"sv_data/image/<model>/*.jpg, Stanford Cars (devkit/cars_meta.mat, cars_train/), or one "
                       f"folder of images per class")


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _has_images(folder: Path) -> bool:
    with os.scandir(folder) as it:
        return any(e.is_file() and is_image(e.name) for e in it)


def _base_for(root: Path, fmt: str) -> Path:
    if fmt == "stanford":
        if (root / "devkit" / "cars_meta.mat").is_file():
            return root
        raise DatasetError(f"{root} has no devkit/cars_meta.mat: not a Stanford Cars folder")
    for base in {"compcars": (root / "data", root), "sv": (root / "sv_data", root)}.get(fmt, (root,)):
        if (base / "image").is_dir() or fmt == "folder":
            return base
    raise DatasetError(f"{root} has no image/ folder for format {fmt!r}")


# ------------------------------------------------------------------------------------------------------- indexing

def _leaf_dirs(base: Path, fmt: str) -> list[Path]:
    """The folders that hold the images: listed without listing the images themselves."""
    if fmt == "stanford":
        return [d for d in (base / "cars_train", base / "cars_test") if d.is_dir()]
    depth = {"compcars": 3, "sv": 1, "folder": 1}[fmt]
    top = base if fmt == "folder" else base / "image"
    level = [top]
    for _ in range(depth):
        level = [d for parent in level for d in _subdirs(parent)]
    return level


def _signature(base: Path, fmt: str, leaves: list[Path]) -> str:
    h = hashlib.sha1()
    extra = [base / "misc" / "make_model_name.mat", base / "misc" / "attributes.txt", base / "sv_make_model_name.mat",
             base / "devkit" / "cars_meta.mat", *(base / f for f in OFFICIAL_LISTS.get(fmt, {}).values())]
    for p in leaves + [p for p in extra if p.exists()]:
        h.update(f"{p.relative_to(base)}:{p.stat().st_mtime_ns}\n".encode())
    return h.hexdigest()


def _cache_file(root: Path, fmt: str) -> Path:
    key = hashlib.sha1(f"{root.resolve()}|{fmt}".encode()).hexdigest()[:16]
    return cache_dir("index") / f"{key}.json"


def index_dataset(root: str | os.PathLike, fmt: str = "auto", use_cache: bool = True) -> DatasetIndex:
    """Index a dataset tree; cached by root, invalidated when an image folder or the name files change."""
    root_path = Path(root)
    if fmt == "auto":
        fmt, base = detect_format(root_path)
    elif fmt in _SCANNERS:
        base = _base_for(root_path, fmt)
    else:
        raise DatasetError(f"unknown dataset format {fmt!r}: use auto, compcars, sv, stanford or folder")
    leaves = _leaf_dirs(base, fmt)
    signature = _signature(base, fmt, leaves)
    cache = _cache_file(root_path, fmt)
    if use_cache and cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("version") == INDEX_VERSION and cached.get("signature") == signature:
                return DatasetIndex(root=str(root), **cached["index"])
        except (OSError, ValueError, TypeError):
            log.warning("index cache %s unreadable; rescanning", cache)
    index = _SCANNERS[fmt](root_path, base, leaves)
    if not index.paths:
        raise DatasetError(f"no images found under {root_path} (format {fmt})")
    if use_cache:
        _write_cache(cache, signature, index)
    return index


def _write_cache(cache: Path, signature: str, index: DatasetIndex) -> None:
    payload = {k: v for k, v in index.__dict__.items() if k != "root"}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(cache) as f:
            f.write(json.dumps({"version": INDEX_VERSION, "signature": signature, "index": payload}))
    except OSError as exc:  # a read-only home must not stop anyone from training
        log.warning("could not write the index cache %s: %s", cache, exc)


def _images_in(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_file() and is_image(e.name))


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _scan_compcars(root: Path, base: Path, leaves: list[Path]) -> DatasetIndex:
    make_names, model_names = read_make_model_names(base / "misc" / "make_model_name.mat")
    index = DatasetIndex(root=str(root), format="compcars", paths=[], keys=[], classes={})
    for year_dir in leaves:
        model_id, make_id = year_dir.parent.name, year_dir.parent.parent.name
        for name in _images_in(year_dir):
            index.paths.append(_rel(year_dir / name, root))
            index.keys.append(model_id)
            label = base / "label" / make_id / model_id / year_dir.name / (os.path.splitext(name)[0] + ".txt")
            viewpoint, bbox = read_label(label)
            index.viewpoints.append(viewpoint)
            index.bboxes.append(bbox)
        if model_id not in index.classes:
            index.classes[model_id] = _compcars_name(make_id, model_id, make_names, model_names)
    index.attributes = read_attributes(base / "misc" / "attributes.txt")
    _dedupe_names(index.classes)
    _read_official_lists(index, root, base, base / "image")
    return index


def _compcars_name(make_id: str, model_id: str, make_names: dict, model_names: dict) -> dict:
    make = make_names.get(make_id) or f"Make {make_id}"
    model = model_names.get(model_id) or f"model {model_id}"
    return {"name": f"{make} {model}", "make": make, "model": model}


def _scan_sv(root: Path, base: Path, leaves: list[Path]) -> DatasetIndex:
    names = read_sv_names(base / "sv_make_model_name.mat")
    index = DatasetIndex(root=str(root), format="sv", paths=[], keys=[], classes={})
    for folder in leaves:
        files = _images_in(folder)
        index.paths += [_rel(folder / f, root) for f in files]
        index.keys += [folder.name] * len(files)
        index.viewpoints += [None] * len(files)
        index.bboxes += [None] * len(files)
        make, model = names.get(folder.name, ("", ""))
        make, model = make or f"Make ? (sv {folder.name})", model or f"model {folder.name}"
        index.classes[folder.name] = {"name": f"{make} {model}", "make": make, "model": model}
    _dedupe_names(index.classes)
    _read_official_lists(index, root, base, base / "image")
    return index


def _scan_folder(root: Path, base: Path, leaves: list[Path]) -> DatasetIndex:
    index = DatasetIndex(root=str(root), format="folder", paths=[], keys=[], classes={})
    for folder in leaves:
        files = _images_in(folder)
        if not files:
            continue
        index.paths += [_rel(folder / f, root) for f in files]
        index.keys += [folder.name] * len(files)
        index.viewpoints += [None] * len(files)
        index.bboxes += [None] * len(files)
        index.classes[folder.name] = {"name": folder.name, "make": folder.name.split()[0], "model": folder.name}
    return index


def _scan_stanford(root: Path, base: Path, leaves: list[Path]) -> DatasetIndex:
    """Stanford Cars as torchvision's StanfordCars reads it: class names from devkit/cars_meta.mat, each split's
    photos, classes (1-based) and boxes from its annotation file; the two annotation files are the official lists."""
    from scipy.io import loadmat
    try:
        names = [str(n).strip() for n in loadmat(str(base / "devkit" / "cars_meta.mat"), squeeze_me=True)
                 ["class_names"].tolist()]
    except Exception as exc:  # scipy raises many types for a damaged file
        raise DatasetError(f"cannot read {base / 'devkit' / 'cars_meta.mat'} ({type(exc).__name__}: {exc})") from None
    index = DatasetIndex(root=str(root), format="stanford", paths=[], keys=[], classes={})
    present = {_rel(folder / name, root) for folder in leaves for name in _images_in(folder)}
    for split, folder in (("train", "cars_train"), ("test", "cars_test")):
        listing = OFFICIAL_LISTS["stanford"][split]
        rows = _stanford_annotations(base / listing)
        missing = []
        for row in rows:
            path = _rel(base / folder / row["fname"], root)
            if path not in present:
                missing.append(path)
                continue
            key = str(row["class"])
            index.paths.append(path)
            index.keys.append(key)
            index.viewpoints.append(None)
            index.bboxes.append([row["bbox_x1"], row["bbox_y1"], row["bbox_x2"], row["bbox_y2"]])
            index.official[path] = split
            if key not in index.classes:
                name = names[row["class"] - 1] if 0 < row["class"] <= len(names) else f"class {key}"
                index.classes[key] = _stanford_class(name)
        index.official_lists[split] = {"file": listing, "listed": len(rows), "missing": len(missing),
                                       "missing_examples": missing[:5]}
    _dedupe_names(index.classes)
    return index


def _stanford_annotations(path: Path) -> list[dict]:
    """The rows of a Stanford Cars annotation file (fname, class, bbox_x1..bbox_y2); none when it is absent."""
    if not path.is_file():
        return []
    from scipy.io import loadmat
    try:
        annotations = loadmat(str(path), squeeze_me=True)["annotations"]
        return [{"fname": str(a["fname"]), "class": int(a["class"]),
                 **{k: int(a[k]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")}}
                for a in np.atleast_1d(annotations)]
    except Exception as exc:
        raise DatasetError(f"cannot read the Stanford Cars annotations {path} ({type(exc).__name__}: {exc})") from None


def _stanford_class(name: str) -> dict:
    """"Aston Martin V8 Vantage Convertible 2012" -> make Aston Martin, model V8 Vantage Convertible 2012."""
    make = next((m for m in MULTI_WORD_MAKES if name.startswith(m + " ")), name.split(" ")[0])
    return {"name": name, "make": make, "model": name[len(make):].strip() or name}


def _read_official_lists(index: DatasetIndex, root: Path, base: Path, images: Path) -> None:
    """The dataset's own train/test lists (paths relative to its image folder), where it has them."""
    present = set(index.paths)
    for split, name in OFFICIAL_LISTS[index.format].items():
        listed = _list_lines(base / name)
        if listed is None:
            continue
        missing = []
        for line in listed:
            path = _rel(images / line, root)
            if path in present:
                index.official[path] = split
            else:
                missing.append(path)
        index.official_lists[split] = {"file": name, "listed": len(listed), "missing": len(missing),
                                       "missing_examples": missing[:5]}


def _list_lines(path: Path) -> list[str] | None:
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return None


_SCANNERS = {"compcars": _scan_compcars, "sv": _scan_sv, "stanford": _scan_stanford, "folder": _scan_folder}


def _dedupe_names(classes: dict[str, dict]) -> None:
    """Two model ids with one name would be indistinguishable in the UI: suffix the id."""
    seen: dict[str, int] = {}
    for c in classes.values():
        seen[c["name"]] = seen.get(c["name"], 0) + 1
    for key, c in classes.items():
        if seen[c["name"]] > 1:
            c["name"] = f"{c['name']} (#{key})"


# --------------------------------------------------------------------------------------------- CompCars metadata

def _mat_strings(arr) -> list[str]:
    """MATLAB cell array (N, 1) of strings → list; empty cells → ''."""
    out = []
    for cell in np.asarray(arr, dtype=object).reshape(-1):
        value = cell
        while isinstance(value, np.ndarray):
            value = value.reshape(-1)[0] if value.size else ""
        out.append(str(value).strip())
    return out


def read_make_model_names(mat_path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """make id → name and model id → name (ids as strings, 1-based); missing file → generated names later."""
    if not mat_path.is_file():
        log.warning("%s not found: classes get generated names", mat_path)
        return {}, {}
    from scipy.io import loadmat
    try:
        mat = loadmat(str(mat_path))
        makes, models = _mat_strings(mat["make_names"]), _mat_strings(mat["model_names"])
    except Exception as exc:  # scipy raises many types for a damaged file
        log.warning("cannot read %s (%s: %s): classes get generated names", mat_path, type(exc).__name__, exc)
        return {}, {}
    return ({str(i + 1): n for i, n in enumerate(makes) if n}, {str(i + 1): n for i, n in enumerate(models) if n})


def read_sv_names(mat_path: Path) -> dict[str, tuple[str, str]]:
    from scipy.io import loadmat
    try:
        cells = np.asarray(loadmat(str(mat_path))["sv_make_model_name"], dtype=object)
        return {str(i + 1): tuple(_mat_strings(cells[i, :2])) for i in range(cells.shape[0])}
    except Exception as exc:
        log.warning("cannot read %s (%s: %s): classes get generated names", mat_path, type(exc).__name__, exc)
        return {}


def read_label(path: Path) -> tuple[int | None, list[int] | None]:
    """(viewpoint, [x1, y1, x2, y2]) from a CompCars label file; (None, None) when missing or malformed."""
    try:
        lines = path.read_text().split("\n")
        viewpoint = int(lines[0])
        box = [int(float(v)) for v in lines[2].split()[:4]]
        return viewpoint, (box if len(box) == 4 else None)
    except (OSError, ValueError, IndexError):
        return None, None


def read_attributes(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    rows = path.read_text().split("\n")
    header = rows[0].split()
    out = {}
    for row in rows[1:]:
        values = row.split()
        if len(values) == len(header):
            out[values[0]] = {h: float(v) for h, v in zip(header[1:], values[1:])}
    return out
