"""Sharing trained models: safetensors or ONNX with config, labels and a model card; the Hugging Face Hub.

    python -m carapp export --run checkpoints/run1 --format safetensors --out exported/run1
    python -m carapp export --run checkpoints/run1 --format onnx --out exported/run1-onnx
    python -m carapp push --run checkpoints/run1 --repo owner/name [--private]      # HF_TOKEN for credentials

An exported folder, or a Hub repo as hf://owner/name[@revision], loads with Predictor.load like a run directory.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from . import rundir
from .dataset.loader import IMAGENET_MEAN, IMAGENET_STD, Letterbox, resize_size
from .engines import export_with_features
from .evaluation.answers import BANK_FILE, CALIBRATION_FILE, STATS_FILE
from .saved import EXPORT_TAG, load_model


def preprocessing(image_size: int, resize: str = "crop") -> dict:
    """What an exported model expects, so other runtimes can feed it without carapp."""
    if resize == "pad":
        fit = {"resize": "pad", "resize_long_side": image_size, "pad_to_square": image_size,
               "pad_fill": list(Letterbox.FILL)}
    else:
        fit = {"resize": "crop", "resize_short_side": resize_size(image_size), "center_crop": image_size}
    return {"input": "float32 NCHW, RGB, batch of any size", **fit, "scale": "pixel / 255", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "output": "logits, one per class in labels.json order: softmax(logits / temperature) for probabilities, "
                      "with the temperature from calibration.json (1 when absent); ONNX: also features, the pooled "
                      "layer3 activations and the stem/layer1/layer2 channel statistics that feature_bank.npz and "
                      "feature_stats.npz score for 'not a car'"}


def export_run(run: str | Path, fmt: str, out: str | Path) -> Path:
    """Write model weights (safetensors) or graph (onnx), config.json, labels.json and README.md to out."""
    if fmt not in ("safetensors", "onnx"):
        raise ValueError(f"format must be safetensors or onnx, not {fmt!r}")
    run, out = Path(run), Path(out)
    model, config, labels, _ = load_model(run)
    out.mkdir(parents=True, exist_ok=True)
    image_size = int(config.get("image_size", 224))
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    else:
        export_with_features(model, image_size, out / "model.onnx")
    info = rundir.read_json(run / "labels.json") if run.is_dir() else None
    rundir.write_json(out / "labels.json", info or [{"index": i, "name": n} for i, n in enumerate(labels)])
    rundir.write_json(out / "config.json", {"format": EXPORT_TAG, "version": 1, "weights": fmt,
                                            "num_classes": len(labels), "preprocessing": preprocessing(image_size, config.get("resize", "crop")),
                                            "training": config})
    for name in (CALIBRATION_FILE, BANK_FILE, STATS_FILE):  # temperature, thresholds, "not a car" score go along
        source = (run if run.is_dir() else run.parent) / name
        if source.is_file():
            shutil.copyfile(source, out / name)
    (out / "README.md").write_text(model_card(run, config, labels))
    return out




RECIPE_FIELDS = ("backbone", "weights", "image_size", "resize", "epochs", "batch_size", "lr", "weight_decay", "dropout",
                 "gamma", "alpha", "sampler", "min_images", "crop_bbox", "seed", "optimizer", "schedule",
                 "label_smoothing", "ema", "freeze_epochs", "negatives", "negatives_weight")


def model_card(run: Path, config: dict, labels: list[str]) -> str:
    """A Hugging Face model card (huggingface_hub.ModelCard: its metadata as a model-index the Hub shows) from the
    run's own figures: its split, its recipe, its test metrics and how its answers can be trusted."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData
    test = (rundir.read_json(run / "test_metrics.json") if run.is_dir() else None) or {}
    calibration = (rundir.read_json(run / CALIBRATION_FILE) if run.is_dir() else None) or {}
    splits = {"train": 0, "val": 0, "test": 0}
    if run.is_dir() and (run / "split.csv").is_file():
        for s in rundir.read_split(run).splits:
            splits[s] += 1
    name = f"carapp-{config.get('backbone', 'resnet50')}-{len(labels)}-classes"
    dataset = Path(str(config.get("data", "?"))).name or "?"
    results = [EvalResult(task_type="image-classification", dataset_type=config.get("format", "auto"),
                          dataset_name=dataset, dataset_split="test", metric_type=metric, metric_value=test[key],
                          metric_name=title) for key, metric, title in
               (("top1", "accuracy", "top-1"), ("top5", "top_5_accuracy", "top-5"), ("macro_f1", "f1", "macro-F1"))
               if test.get(key) is not None]
    data = ModelCardData(library_name="pytorch", pipeline_tag="image-classification", datasets=["CompCars"],
                         tags=["image-classification", "cars", "fine-grained", "resnet", "focal-loss", "carapp"],
                         metrics=["accuracy", "f1"], model_name=name, eval_results=results or None)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{_card_body(config, labels, test, calibration, splits)}"))


def _card_body(config: dict, labels: list[str], test: dict, calibration: dict, splits: dict) -> str:
    total = sum(splits.values()) or 1
    kept = (f"the classes with at least {config['min_images']} images" if config.get("min_images") is not None
            else "the classes with at least the mean number of images per class (floored)")
    split_how = "split class by class into"
    if config.get("split") == "official":  # the dataset's own lists: comparable with published results
        kept = "every class of the dataset's own train/test lists"
        split_how = "split as those lists say (validation carved from their train part, class by class):"
    shown = ", ".join(labels[:40]) + (f", … ({len(labels) - 40} more in labels.json)" if len(labels) > 40 else "")
    recipe = "\n".join(f"| {k} | {config.get(k)} |" for k in RECIPE_FIELDS if k in config)
    metrics = "\n".join(f"| {title} | {test[key]:.4f} |" for key, title in
                        (("top1", "top-1"), ("top5", "top-5"), ("macro_f1", "macro-F1"), ("make_top1", "make top-1"),
                         ("ece", "ECE (calibrated)"), ("coverage", "answered with a model"),
                         ("selective_accuracy", "right among those")) if test.get(key) is not None)
    metrics += f"\n| test images | {test['num_images']} |" if test.get("num_images") else "| (not evaluated) | |"
    trust = (f"Calibrated on the validation split: temperature {calibration['temperature']:.3f}, answer thresholds "
             f"model {calibration['thresholds']['model']:.3f} and make {calibration['thresholds']['make']:.3f} (the "
             f"confidences at which validation answers are {calibration.get('target_accuracy', 0.95):.0%} right); "
             f"'not a car' from {', '.join(calibration.get('ood_signals', ['layer3']))}."
             if calibration.get("thresholds") else "Not calibrated: the probabilities are the raw softmax.")
    return f"""
# carapp car make/model classifier ({config.get('backbone', 'resnet50')}, {len(labels)} classes)

A {config.get('backbone', 'resnet50')} trained with focal loss by carapp to name the make and model of a car in a
photo, following "Classification of Car Models with ResNet-50" (Tabar & Pegoraro).

## Classes
{len(labels)} make-model classes: {shown}.

## Training data
Dataset folder `{config.get('data', '?')}` (format `{config.get('format', 'auto')}`), {kept}, {split_how} train {splits['train']} / val {splits['val']} / test {splits['test']}
images ({splits['train'] / total:.0%} / {splits['val'] / total:.0%} / {splits['test'] / total:.0%}). If this is the
synthetic demo set, the model knows only drawn cartoon cars.

## Recipe
| setting | value |
|---|---|
{recipe}

## Metrics (best checkpoint on the test split)
| metric | value |
|---|---|
{metrics}

{trust}

## Use
```python
from carapp.predict import Predictor
p = Predictor.load("hf://OWNER/NAME")      # or the exported folder
print(p.predict(Image.open("car.jpg")).top)
```
Preprocessing for other runtimes (ONNX): see `config.json` → `preprocessing`.

## Intended use
Recognising car makes and models in photos of whole cars, e.g. to tag or count models in social-media images, and
to show with Grad-CAM which parts of the car the prediction rests on.

## Limitations
Knows only the classes above. With carapp, a calibrated model (calibration.json, feature_bank.npz,
feature_stats.npz) answers "model", "make" (model unsure), "unsure" or "no-car"; the raw network alone answers with
one of its classes for any image, car or not. Trained on web photos of whole cars: close-ups, interiors, night or
surveillance views, heavy occlusion, and models or years outside the training data will be misclassified, often
with confidence. Class imbalance in the training data affects rarer models. Not for identifying individual vehicles
or people.
"""


def push(run: str | Path, repo: str, private: bool = False) -> str:
    """Export to safetensors and upload to the Hub; returns the repo URL."""
    from huggingface_hub import HfApi, get_token
    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:  # checked before the export: a missing token is the usual first failure
        raise ValueError("push needs a Hugging Face token with write access: create one at "
                         "https://huggingface.co/settings/tokens and set HF_TOKEN=hf_... (or run `hf auth login`)")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_run(run, "safetensors", tmp)
        card = (folder / "README.md").read_text().replace("OWNER/NAME", repo)
        (folder / "README.md").write_text(card)
        try:
            url = api.create_repo(repo, private=private, exist_ok=True)
            api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message="carapp export")
        except Exception as exc:  # network, auth and Hub errors of any client library: one clear message
            raise OSError(f"upload to the Hugging Face Hub failed ({type(exc).__name__}: {exc}); check the "
                          f"network, that the token may write to {repo}, and try again") from None
    return str(url)
