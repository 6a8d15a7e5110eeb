"""Dataset health: exact and near duplicates, duplicate groups that span classes (label conflicts) or splits (leaks),
unreadable files, tiny images, extreme aspect ratios, greyscale photos and car boxes outside their image.

    python -m carapp health --data ROOT [--run checkpoints/run1] [--json]

Each file is read once: a content hash (exact duplicates), three perceptual hashes (imagehash's pHash of the whole
photo and of its centre at 4% and 8% in from each side, so a resized, recompressed or slightly cropped copy lands
within a few bits of its original), its size and whether it is greyscale. The facts are cached per file, keyed by
size and modification time, in the user cache (never beside the dataset, which may be read-only), so a second pass
only stats the files. Near pairs are found without comparing every pair: two 64-bit hashes within 6 bits agree
exactly on at least 2 of their 8 bytes, so only hashes sharing a pair of bytes are compared.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import atomic_writer
from ..cache import cache_dir
from .images import ImageError, open_image
from .index import DatasetIndex, index_dataset

log = logging.getLogger(__name__)

CACHE_VERSION = 2
CROPS = (0.0, 0.04, 0.08)   # pHash of the photo and of its centre this far in from each side
NEAR_BITS = 6               # at most 6 of 64 bits apart: a copy (demo data: distinct photos are >= 6 apart)
TINY_SIDE = 64              # shorter side in pixels below which a photo is too small to train on
EXTREME_ASPECT = 4.0        # longer side over shorter side
PARALLEL_FROM = 256         # files to hash before worker processes pay for their start-up


class HealthError(ValueError):
    """A health check that cannot run (a run of another dataset); the message says why."""


# ---------------------------------------------------------------------------------------------------- per file

def file_facts(path: str) -> dict:
    """What health needs of one file: content hash, perceptual hashes, size, greyscale; or the reason it fails."""
    name = os.path.basename(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return {"error": f"{name}: file not found"}
    except OSError as exc:
        return {"error": f"{name}: cannot be read ({exc.strerror})"}
    if not data:
        return {"error": f"{name}: empty file (0 bytes)"}
    try:
        img = open_image(io.BytesIO(data), draft_size=64)  # JPEG decodes at 1/2..1/8 scale: all a hash needs
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except ImageError as exc:
        return {"error": f"{name}: {exc.reason}"}
    except Exception as exc:  # any decoder failure: the file is reported, the scan goes on
        return {"error": f"{name}: damaged or truncated image ({exc})"}
    return {"sha1": hashlib.sha1(data).hexdigest(), "phash": perceptual_hashes(img), "colour": colour_sketch(img),
            "width": width, "height": height, "gray": _is_gray(img)}


def colour_sketch(img: Image.Image) -> str:
    """The mean colour of a 4 x 4 grid over the photo's centre: pHash reads brightness only, so two drawings of one
    layout in different colours can share it; a copy keeps its colours."""
    w, h = img.size
    a = CROPS[1]
    centre = img.crop((round(w * a), round(h * a), round(w * (1 - a)), round(h * (1 - a))))
    return centre.resize((4, 4), Image.BOX).tobytes().hex()


def same_colours(a: str, b: str, tolerance: float = 16.0) -> bool:
    """Mean absolute difference of two colour sketches, 0..255, within tolerance."""
    return float(np.abs(np.frombuffer(bytes.fromhex(a), np.uint8).astype(np.int16)
                        - np.frombuffer(bytes.fromhex(b), np.uint8)).mean()) <= tolerance


def perceptual_hashes(img: Image.Image) -> list[str]:
    import imagehash
    gray = img.convert("L")
    w, h = gray.size
    return [str(imagehash.phash(gray.crop((round(w * a), round(h * a), round(w * (1 - a)), round(h * (1 - a))))))
            for a in CROPS]


def _is_gray(img: Image.Image) -> bool:
    """No pixel's channels differ by more than JPEG's colour noise."""
    small = np.asarray(img.resize((32, 32)), dtype=np.int16)
    return int(np.abs(small - small[..., :1]).max()) <= 12


def _facts_of(args: tuple[str, str]) -> tuple[str, dict]:
    root, rel = args
    return rel, file_facts(os.path.join(root, rel))


# ---------------------------------------------------------------------------------------------------- the cache

def _cache_file(root: str) -> Path:
    return cache_dir("health") / (hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:16] + ".json")


def _read_cache(path: Path) -> dict:
    try:
        cached = json.loads(path.read_text())
        return cached["files"] if cached.get("version") == CACHE_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write_cache(path: Path, files: dict) -> None:
    _write_json(path, {"version": CACHE_VERSION, "files": files})


def _write_json(path: Path, obj) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(path) as f:
            f.write(json.dumps(obj))
    except OSError as exc:  # a full or read-only cache costs the next pass its speed, nothing else
        log.warning("health cache not written (%s)", exc)


def collect_facts(index: DatasetIndex, workers: int | None = None, on_progress=None,
                  cached_only: bool = False) -> dict[str, dict]:
    """Facts for every file of the index: cached ones when size and mtime still match, new ones in parallel.
    cached_only refuses to read any file anew (a public app: a visitor must not start minutes of hashing)."""
    cache_path = _cache_file(index.root)
    cached, facts, todo = _read_cache(cache_path), {}, []
    for rel in index.paths:
        try:
            st = os.stat(os.path.join(index.root, rel))
            stamp = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamp = None
        hit = cached.get(rel)
        if stamp and hit and hit.get("stamp") == stamp:
            facts[rel] = hit
        else:
            todo.append((rel, stamp))
    if todo and cached_only:
        raise HealthError(f"{len(todo):,} of {len(index.paths):,} photos have not been checked yet: the owner runs "
                          "`python -m carapp health --data DATASET` once, then this view is quick")
    workers = workers or min(8, os.cpu_count() or 1)
    jobs = [(index.root, rel) for rel, _ in todo]
    if len(jobs) >= PARALLEL_FROM and workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            results = pool.map(_facts_of, jobs, chunksize=64)
            fresh = _with_progress(results, len(jobs), on_progress)
    else:
        fresh = _with_progress(map(_facts_of, jobs), len(jobs), on_progress)
    for (rel, stamp), (_, new) in zip(todo, fresh):
        facts[rel] = {**new, "stamp": stamp}
    if todo:
        _write_cache(cache_path, {**cached, **facts})
    return facts


def _with_progress(results, total: int, on_progress) -> list:
    out = []
    for i, r in enumerate(results, 1):
        out.append(r)
        if on_progress and (i % 200 == 0 or i == total):
            on_progress(i, total)
    return out


# ---------------------------------------------------------------------------------------------------- grouping

def near_pairs(hashes: np.ndarray, max_bits: int = NEAR_BITS) -> np.ndarray:
    """(i, j) index pairs, i < j, of 64-bit hashes at most max_bits apart.

    Pigeonhole: hashes at most 6 bits apart differ in at most 6 of their 8 bytes, so they agree on some pair of
    byte positions; only hashes agreeing on such a pair (28 choices, 16-bit keys) are compared."""
    if not 0 <= max_bits <= 6:
        raise ValueError("near-duplicate threshold must be 0..6 bits")
    hashes = np.asarray(hashes, dtype=np.uint64)
    octets = hashes.view(np.uint8).reshape(-1, 8)
    found = []
    for a, b in itertools.combinations(range(8), 2):
        key = octets[:, a].astype(np.int32) << 8 | octets[:, b]
        order = np.argsort(key, kind="stable")
        i, j = _pairs_within_runs(order, key[order])
        close = np.bitwise_count(hashes[i] ^ hashes[j]) <= max_bits
        found.append(np.stack([np.minimum(i, j)[close], np.maximum(i, j)[close]], 1))
    pairs = np.concatenate(found) if found else np.empty((0, 2), np.int64)
    return np.unique(pairs, axis=0) if len(pairs) else pairs


def _pairs_within_runs(order: np.ndarray, sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of positions whose sorted keys are equal, as indices into the original array."""
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    lengths = np.diff(np.r_[starts, len(sorted_keys)])
    run_end = np.repeat(starts + lengths, lengths)          # one past each element's run
    later = run_end - np.arange(len(sorted_keys)) - 1        # members after each element in its run
    first = np.repeat(np.arange(len(sorted_keys)), later)
    offset = np.arange(len(first)) - np.repeat(np.cumsum(later) - later, later) + 1
    return order[first], order[first + offset]


class _Groups:
    """Union-find over file indices."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        self.parent[self.find(i)] = self.find(j)

    def groups(self) -> list[list[int]]:
        members: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            members.setdefault(self.find(i), []).append(i)
        return [m for m in members.values() if len(m) > 1]


@dataclass
class Duplicates:
    exact: list[list[str]]          # groups of byte-identical files
    near: list[list[str]]           # groups of look-alike files holding at least two different contents
    linked: list[list[str]]         # exact and near together: what must stay in one split


def find_duplicates(paths: list[str], facts: dict[str, dict], max_bits: int = NEAR_BITS) -> Duplicates:
    ok = [p for p in paths if "sha1" in facts.get(p, {})]
    by_sha: dict[str, list[str]] = {}
    for p in ok:
        by_sha.setdefault(facts[p]["sha1"], []).append(p)
    exact = sorted(g for g in by_sha.values() if len(g) > 1)
    file_of = np.repeat(np.arange(len(ok)), len(CROPS))
    hashes = np.array([int(h, 16) for p in ok for h in facts[p]["phash"]], dtype=np.uint64)
    colours = [facts[p]["colour"] for p in ok]
    # the pair search runs over distinct hash values; the files behind one value are compared with each other
    values, which = np.unique(hashes, return_inverse=True)
    files_of: dict[int, list[int]] = {}
    for k in np.argsort(which, kind="stable"):
        files_of.setdefault(int(which[k]), []).append(int(file_of[k]))
    near_union, linked_union = _Groups(len(ok)), _Groups(len(ok))

    def link(i: int, j: int) -> None:
        if i != j and same_colours(colours[i], colours[j]):
            near_union.union(i, j)
            linked_union.union(i, j)

    for members in files_of.values():
        for j in members[1:]:
            link(members[0], j)
    for u, v in near_pairs(values, max_bits):
        for i in files_of[int(u)]:
            for j in files_of[int(v)]:
                link(i, j)
    position = {p: k for k, p in enumerate(ok)}
    for group in exact:
        for p in group[1:]:
            linked_union.union(position[group[0]], position[p])
    near = [sorted(ok[k] for k in g) for g in near_union.groups()
            if len({facts[ok[k]]["sha1"] for k in g}) > 1]  # a group of identical bytes is an exact one only
    return Duplicates(exact=exact, near=sorted(near), linked=sorted(sorted(ok[k] for k in g)
                                                                       for g in linked_union.groups()))


# ---------------------------------------------------------------------------------------------------- the report

def check_health(root: str, fmt: str = "auto", run: str | None = None, workers: int | None = None,
                 max_bits: int = NEAR_BITS, on_progress=None, cached_only: bool = False) -> dict:
    """The health report of a dataset (and, with a run of it, the duplicate groups its split leaks)."""
    index = index_dataset(root, fmt)
    facts = collect_facts(index, workers, on_progress, cached_only)
    dups = cached_duplicates(index, facts, max_bits)
    class_of = {p: index.classes[k]["name"] for p, k in zip(index.paths, index.keys)}
    good = [(p, facts[p]) for p in index.paths if "sha1" in facts[p]]
    report = {
        "root": index.root,
        "num_images": len(index.paths),
        "exact_duplicates": dups.exact,
        "near_duplicates": dups.near,
        "label_conflicts": [{"paths": g, "classes": sorted({class_of[p] for p in g})} for g in dups.linked
                            if len({class_of[p] for p in g}) > 1],
        "unreadable": [{"path": p, "reason": facts[p]["error"]} for p in index.paths if "error" in facts[p]],
        "tiny": [p for p, f in good if min(f["width"], f["height"]) < TINY_SIDE],
        "extreme_aspect": [p for p, f in good if max(f["width"], f["height"]) >= EXTREME_ASPECT *
                           min(f["width"], f["height"])],
        "grayscale": [p for p, f in good if f["gray"]],
        "bbox_outside": _boxes_outside(index, facts),
    }
    if run:
        report["leaks"] = find_leaks(Path(run), index, dups.linked)
    report["counts"] = {k: len(v) for k, v in report.items() if isinstance(v, list)}
    report["counts"]["grayscale_share"] = round(len(report["grayscale"]) / max(1, len(good)), 4)
    report["counts"]["duplicate_files"] = sum(len(g) - 1 for g in dups.linked)  # copies beyond the first of each
    return report


def _boxes_outside(index: DatasetIndex, facts: dict[str, dict]) -> list[dict]:
    """CompCars boxes (1-based x1 y1 x2 y2) that leave the image or have no area."""
    bad = []
    for p, box in zip(index.paths, index.bboxes or []):
        f = facts.get(p, {})
        if box is None or "width" not in f:
            continue
        x1, y1, x2, y2 = box
        if x1 < 1 or y1 < 1 or x2 > f["width"] or y2 > f["height"] or x2 <= x1 or y2 <= y1:
            bad.append({"path": p, "bbox": box, "size": [f["width"], f["height"]]})
    return bad


def find_leaks(run: Path, index: DatasetIndex, linked: list[list[str]]) -> list[dict]:
    """Duplicate groups whose members the run put in more than one of train/val/test."""
    import csv
    split_csv = run / "split.csv"
    if not split_csv.is_file():
        raise HealthError(f"{run} is not a run directory (no split.csv)")
    with open(split_csv, newline="") as f:
        split_of = {row["path"]: row["split"] for row in csv.DictReader(f)}
    known = set(index.paths)
    if split_of and sum(p in known for p in split_of) < 0.5 * len(split_of):
        trained_on = (json.loads((run / "config.json").read_text()).get("data", "?")
                      if (run / "config.json").is_file() else "?")
        raise HealthError(f"run {run.name} was trained on another dataset ({trained_on}): most of its split's "
                          f"images are not in {index.root}")
    leaks = []
    for group in linked:
        inside = [p for p in group if p in split_of]
        if len({split_of[p] for p in inside}) > 1:
            leaks.append({"paths": inside, "splits": [split_of[p] for p in inside]})
    return leaks


def duplicate_groups(index: DatasetIndex, workers: int | None = None) -> list[list[str]]:
    """The groups a leak-free split keeps together (exact and near duplicates, linked)."""
    return cached_duplicates(index, collect_facts(index, workers)).linked


def cached_duplicates(index: DatasetIndex, facts: dict[str, dict], max_bits: int = NEAR_BITS) -> Duplicates:
    """find_duplicates, remembered for the same files with the same hashes: the pair search is the costly part of
    a second pass over a big tree (~10 s at CompCars' size), and its answer only changes when a file does."""
    digest = hashlib.sha1(f"{max_bits}|{CROPS}".encode())
    for p in index.paths:
        f = facts.get(p, {})
        digest.update(f"{p}|{f.get('sha1')}|{f.get('colour')}|{f.get('phash')}\n".encode())
    path = _cache_file(index.root).with_suffix(".groups.json")
    try:
        cached = json.loads(path.read_text())
        if cached.get("digest") == digest.hexdigest():
            return Duplicates(cached["exact"], cached["near"], cached["linked"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    dups = find_duplicates(index.paths, facts, max_bits)
    _write_json(path, {"digest": digest.hexdigest(), **dataclasses.asdict(dups)})
    return dups

