"""Near-duplicate recall of `carapp.dataset.health` on the demo set: each of 120 demo photos against one altered copy.

    python bench/near_duplicates.py [--photos 120]

Alterations: centre crops of 2/4/6% a side, crops of 2/4/6% from one side, resized x2 and x0.5 saved at JPEG q30.
Also the false pairs among all distinct demo photos. Prints one JSON line per figure.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from carapp.dataset.demo import make_demo_dataset  # noqa: E402
from carapp.dataset.health import file_facts, find_duplicates  # noqa: E402

ALTERATIONS = {
    **{f"centre crop {a:.0%} a side": (lambda im, a=a: im.crop((round(im.width * a), round(im.height * a),
                                                               round(im.width * (1 - a)), round(im.height * (1 - a)))))
       for a in (0.02, 0.04, 0.06)},
    **{f"crop {a:.0%} from one side": (lambda im, a=a: im.crop((0, 0, round(im.width * (1 - a)), im.height)))
       for a in (0.02, 0.04, 0.06)},
    "resized x2, JPEG q30": lambda im: im.resize((im.width * 2, im.height * 2)),
    "resized x0.5, JPEG q30": lambda im: im.resize((im.width // 2, im.height // 2)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=120, help="demo photos to alter")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make_demo_dataset(Path(tmp) / "demo")
        photos = sorted((Path(tmp) / "demo").rglob("*.jpg"))
        facts = {str(p): file_facts(str(p)) for p in photos}
        dups = find_duplicates(list(facts), facts)
        print(json.dumps({"figure": "false pairs among distinct demo photos", "photos": len(photos),
                          "near_groups": len(dups.near), "exact_groups": len(dups.exact)}), flush=True)
        for name, alter in ALTERATIONS.items():
            found = 0
            for i, p in enumerate(photos[:args.photos]):
                copy = Path(tmp) / f"copy{i}.jpg"
                alter(Image.open(p).convert("RGB")).save(copy, quality=30 if "q30" in name else 90)
                pair = {str(p): facts[str(p)], str(copy): file_facts(str(copy))}
                found += bool(find_duplicates(list(pair), pair).near)
            print(json.dumps({"figure": name, "photos": args.photos, "recall": round(found / args.photos, 3)}),
                  flush=True)


if __name__ == "__main__":
    main()
