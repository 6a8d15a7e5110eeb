"""What each CLI command prints for a person (without --json): short lines on stdout, one result per line.

With --json the same result goes out as one JSON value instead; logs go to stderr either way.
"""
from __future__ import annotations


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def demo_data(r: dict) -> str:
    line = f"Wrote a synthetic demo dataset: {r['num_images']:,} images of {r['num_models']} models in {r['root']}"
    if r.get("scenes"):
        line += (f"\nand {r['scenes']} multi-car scenes ({r['scene_cars']} cars, boxes in scenes.json) in "
                 f"{r['scenes_dir']}")
    return line


def stats(r: dict) -> str:
    s, imb = r["splits"], r["imbalance"]
    lines = [f"{r['format']} dataset at {r['root']}",
             f"{r['num_images']:,} images, {r['num_classes']:,} classes, {r['num_makes']:,} makes",
             f"kept: {r['num_classes_kept']:,} classes with >= {r['min_images']} images, "
             f"{r['num_images_kept']:,} images",
             f"split: train {s['train']:,}, val {s['val']:,}, test {s['test']:,}"
             + (f" ({r['duplicate_groups_merged']} duplicate groups kept in one split each)"
                if "duplicate_groups_merged" in r else ""),
             f"imbalance: largest class {imb['largest_class']}, smallest {imb['smallest_class']} "
             f"(ratio {imb['ratio']})"]
    if r.get("viewpoints"):
        lines.append("viewpoints: " + ", ".join(f"{k} {v:,}" for k, v in r["viewpoints"].items()))
    if "unreadable" in r:
        bad = r["unreadable"]
        lines.append(f"unreadable: {bad['count']}" + (f" (e.g. {', '.join(bad['examples'])})" if bad["count"] else ""))
    return "\n".join(lines)


def health(r: dict) -> str:
    c = r["counts"]
    lines = [f"{r['num_images']:,} images at {r['root']}",
             f"exact duplicates: {c['exact_duplicates']} groups; near duplicates: {c['near_duplicates']} groups; "
             f"{c['duplicate_files']} files are copies of another",
             f"label conflicts (a group in two classes): {c['label_conflicts']}",
             f"unreadable: {c['unreadable']}; tiny (< 64 px): {c['tiny']}; extreme aspect: {c['extreme_aspect']}; "
             f"greyscale: {c['grayscale']} ({c['grayscale_share']:.1%}); boxes outside the image: {c['bbox_outside']}"]
    if "leaks" in r:
        lines.append(f"leaks (a group on two sides of the run's split): {c['leaks']}")
    for title, groups in (("exact", r["exact_duplicates"]), ("near", r["near_duplicates"]),
                          ("leak", [g["paths"] for g in r.get("leaks", [])])):
        lines += [f"  {title}: " + "  ".join(g) for g in groups[:5]]
        if len(groups) > 5:
            lines.append(f"  ... {len(groups) - 5} more {title} groups (--json lists all)")
    lines += [f"  unreadable: {u['reason']}" for u in r["unreadable"][:5]]
    return "\n".join(lines)


def evaluation(r: dict) -> str:
    line = (f"{r.get('split', 'test')}: top-1 {_pct(r['top1'])}, top-5 {_pct(r['top5'])}, "
            f"macro-F1 {r['macro_f1']:.3f} on {r['num_images']:,} images")
    if "ece" in r:
        line += (f"\nmake top-1 {_pct(r['make_top1'])}, ECE {r['ece']:.3f}; answered with a model "
                 f"{_pct(r['coverage'])}" + ("" if r["selective_accuracy"] is None else
                                             f", of those right {_pct(r['selective_accuracy'])}"))
    return line


def train(r: dict) -> str:
    line = f"{r['status']} after {r['epochs']} epochs"
    if r.get("best_val_loss") is not None:
        line += f", best val loss {r['best_val_loss']:.4f}"
    if r.get("test"):
        line += "\n" + evaluation(r["test"])
    return line


def calibrate(r: dict) -> str:
    t = r["thresholds"]
    from .evaluation.answers import threshold_note
    from .evaluation.trust import CAR_SIGNALS
    kept = "" if r.get("temperature_fitted", r["temperature"]) == r["temperature"] else \
        f" (the fitted {r['temperature_fitted']:.3f} made validation worse: not used)"
    return "\n".join(filter(None, [
        f"temperature {r['temperature']:.3f}{kept}; validation ECE {r['ece_before']:.4f} -> {r['ece_after']:.4f}",
        f"answer thresholds: model {t['model']:.3f}, make {t['make']:.3f}",
        f"'not a car' above {t['ood']:.3f} on the largest of: {', '.join(r['ood_signals'])} (each scaled on the "
        f"validation cars)" if t.get("ood") is not None and r.get("ood_signals") else "",
        f"a car a detector found: 'not a car' above {t['ood_car']:.3f} on {', '.join(CAR_SIGNALS)} (the validation "
        f"cars moved onto the negatives)" if t.get("ood_car") is not None else "", threshold_note(r)]))


def export(r: dict) -> str:
    return f"Exported to {r['out']}: {', '.join(r['files'])}"


def push(r: dict) -> str:
    return f"Uploaded to {r['url']}"


def cache(r: dict) -> str:
    return f"Wrote {r['images']:,} resized images to {r['cache']}"


def sweep(rows: list[dict]) -> str:
    lines = [f"{'run':<28} {'status':<10} {'epochs':>6} {'best val acc':>12} {'test top-1':>10}"]
    for r in rows:
        lines.append(f"{r['run']:<28} {str(r['status'])[:10]:<10} {r['epochs']:>6} {_pct(r['best_val_acc']):>12} "
                     f"{_pct(r['test_top1']):>10}")
    return "\n".join(lines)


def lr_find(r: dict) -> str:
    return (f"suggested learning rate {r['suggested_lr']:.2e} (steepest descent of the smoothed loss); "
            f"lowest loss at {r['min_loss_lr']:.2e}\n{r['steps']} steps from {r['lrs'][0]:.1e} to {r['lrs'][-1]:.1e}"
            + (", stopped when the loss diverged" if r["diverged"] else ""))


def train_detector(r: dict) -> str:
    return f"{r['status']} after {r['epochs']} epochs, best val AP50 {r['best_ap50']:.3f}"


def runs(rows: list[dict]) -> str:
    if not rows:
        return "no runs here"
    lines = [f"{'run':<28} {'status':<12} {'epochs':>9} {'best val acc':>12}  eta"]
    for r in rows:
        epochs = f"{r['epochs_done']}/{r['epochs'] or '?'}"
        eta = f"{r['eta_seconds']:.0f} s" if r["eta_seconds"] is not None else ""
        lines.append(f"{r['name'][:28]:<28} {r['status']:<12} {epochs:>9} {_pct(r['best_val_acc']):>12}  {eta}")
    return "\n".join(lines)


HUMAN = {"demo-data": demo_data, "stats": stats, "health": health, "train": train, "evaluate": evaluation,
         "calibrate": calibrate, "export": export, "push": push, "cache": cache, "sweep": sweep, "lr-find": lr_find,
         "runs": runs, "train-detector": train_detector}
