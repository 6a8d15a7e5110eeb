"""The training configuration: one small dataclass, the paper's recipe as defaults, and named presets."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import asdict, dataclass, field


BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
OPTIMIZERS = ("adam", "adamw", "sgd")
RESIZES = ("crop", "pad")
CAM_METHODS = ("gradcam", "gradcam++", "scorecam", "eigencam", "layercam")  # gradcam: one forward pass
TRACKERS = ("tensorboard", "mlflow", "wandb")
SCHEDULES = ("plateau", "cosine")
SPLITS = ("paper", "official")
EMA_DECAY = 0.9998  # --ema alone: an average over about the last 5,000 steps (a few CompCars epochs at batch 64)


def tracker_names(log: str) -> list[str]:
    """The experiment trackers a `log` setting names: "" none, "tensorboard", or several comma-separated."""
    return [name.strip() for name in log.split(",") if name.strip()]


def batch_size_value(text: str | int) -> int | str:
    """--batch-size N or --batch-size auto."""
    if text == "auto" or isinstance(text, int):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, not {text!r}") from None


def option(help: str, *, parse=None, choices: tuple | None = None, flag: str | None = None, form: str = "",
           label: str = "", info: str = "", metavar: str | None = None, const=None) -> dict:
    """A training option's one declaration, as dataclass field metadata: what `train --help` says (help; a bool's
    `flag`, e.g. --no-amp for one that is on by default), how a value is read (`parse`, else the default's type),
    its `choices` (named in the help and offered by the form; TrainConfig checks them), a value the flag alone
    stands for (`const`, e.g. --ema alone: the usual decay), and where the app's Train
    form shows it (`form`: basic | advanced; "": not in the form) with its `label` and `info`. A field without
    metadata is no option (the dataset root, which each command takes itself; what a run records of itself)."""
    return {"help": help, "parse": parse, "choices": choices, "flag": flag, "form": form, "label": label,
            "info": info, "metavar": metavar, "const": const}


def _field(default, help: str, **how):
    return field(default=default, metadata=option(help, **how))


@dataclass
class TrainConfig:
    # data
    data: str = ""                  # dataset root (CompCars root, its data/ folder, sv_data, or class-per-folder)
    format: str = _field("auto", "dataset format: auto | compcars | sv | stanford | folder")
    split: str = _field("paper", "paper (the paper's: classes with >= --min-images photos, stratified 70/15/15) | "
                        "official (the dataset's own train/test lists, as published results use them: CompCars "
                        "classification or surveillance, Stanford Cars; validation carved from train, no class "
                        "filter)", choices=SPLITS, form="advanced", label="Split",
                        info="paper: the paper's 70/15/15 · official: the dataset's own train/test lists")
    min_images: int | None = _field(None, "keep classes with at least N images (default floor(mean), as in the "
                                    "paper; 0 keeps all)", parse=int)
    crop_bbox: bool = _field(False, "crop images to the labelled car box")
    val_frac: float = _field(0.15, "share of each class held out for validation")
    group_duplicates: bool = _field(
        False, "keep each group of exact and near-duplicate photos in one split, so no copy of a test photo is "
        "trained on (hashes the dataset once, cached; default off: the paper's photo-by-photo split)",
        form="advanced", label="Keep duplicates in one split", info="no copy of a test photo is trained on (Dataset "
        "tab: Health)")
    exclude: str = _field("", "CSV of photos to leave out (path,reason; paths relative to the dataset root)",
                          metavar="FILE")
    test_frac: float = _field(0.15, "share of each class held out for the test")
    image_size: int = _field(224, "input size in pixels", form="basic", label="Image size")
    resize: str = _field("crop", "crop (short side, centre crop) | pad (letterbox the whole photo: keeps a wide car's "
                         "ends)", choices=RESIZES, form="advanced", label="Resize",
                         info="crop: centre crop · pad: whole photo, letterboxed")
    # model
    backbone: str = _field("resnet50", " | ".join(BACKBONES), choices=BACKBONES, form="basic", label="Backbone")
    weights: str = _field("none", "imagenet | none | PATH to a torchvision-format .pth", form="basic",
                          label="Weights", info="imagenet | none (a private app: or a path to .pth)")
    dropout: float = _field(0.2, "dropout before the classifier", form="basic", label="Dropout")
    # imbalance
    sampler: str = _field("weighted", "weighted | none", choices=("weighted", "none"))
    alpha: str = _field("inverse", "focal loss alpha: inverse | effective | none",
                        choices=("inverse", "effective", "none"))
    gamma: float = _field(2.0, "focal loss gamma", form="basic", label="Focal gamma")
    label_smoothing: float = _field(0.0, "label smoothing combined with the focal loss (0: none)", form="advanced",
                                    label="Label smoothing", info="0: none")
    # optimisation
    epochs: int = _field(100, "maximum epochs", form="basic", label="Max epochs")
    batch_size: int | str = _field(64, "batch size, or auto: the largest that fits on the GPU (CPU: 64)",
                                   parse=batch_size_value, form="basic", label="Batch size")
    batch_size_auto: bool = False   # batch_size was found by "auto" on CUDA: an out-of-memory error halves it
    lr: float = _field(1e-3, "learning rate (of the head, with --layer-lr-decay)", form="basic", label="Learning rate")
    weight_decay: float = _field(1e-5, "weight decay", form="basic", label="Weight decay")
    optimizer: str = _field("adam", "adam (the paper) | adamw (decoupled weight decay) | sgd (momentum 0.9, "
                            "Nesterov)", choices=OPTIMIZERS, form="advanced", label="Optimizer",
                            info="adam: the paper · adamw: decoupled decay · sgd: Nesterov momentum 0.9")
    decay_norm_bias: bool = _field(True, "no weight decay on normalisation weights and biases",
                                   flag="--no-decay-norm-bias", form="advanced", label="Weight decay on norm/bias",
                                   info="off: the fine-tuning way")
    freeze_epochs: int = _field(0, "train only the head for the first N epochs, then the whole network",
                                form="advanced", label="Head-only epochs", info="trunk frozen first")
    layer_lr_decay: float = _field(1.0, "lr multiplier per ResNet stage below the head (head x1, layer4 x d, ... "
                                   "stem x d^5)", form="advanced", label="Layer-wise LR decay",
                                   info="per stage below the head; 1: off")
    ema: float = _field(0.0, f"keep an exponential moving average of the weights (--ema alone: decay {EMA_DECAY}); "
                        "validation and best.pt use it when it validates better (default 0: off)", metavar="DECAY", const=EMA_DECAY,
                        form="advanced", label="EMA decay", info="weights average; 0: off")
    schedule: str = _field("plateau", "learning-rate schedule: plateau (ReduceLROnPlateau on val loss) | cosine "
                           "(per step)", choices=SCHEDULES, form="advanced", label="LR schedule",
                           info="plateau: on val loss (the paper) · cosine: per step")
    warmup_epochs: float = _field(0.0, "cosine: linear warmup over this many epochs", form="advanced",
                                  label="Warmup epochs", info="cosine: linear warmup")
    lr_factor: float = _field(0.1, "ReduceLROnPlateau factor")
    lr_patience: int = _field(1, "ReduceLROnPlateau patience")
    patience: int = _field(3, "early stopping: epochs without val-loss improvement", form="basic",
                           label="Early-stop patience")
    steps_per_epoch: int | None = _field(None, "steps per epoch (default: one pass over the training split)",
                                         parse=int)
    # runtime
    seed: int = _field(0, "seed of the split and the sampler")
    workers: int = _field(2, "data loader worker processes", form="basic", label="Loader workers")
    device: str = _field("auto", "auto | cpu | cuda | mps")
    amp: bool = _field(True, "no mixed precision on CUDA", flag="--no-amp")
    channels_last: bool = True      # on CUDA (ignored on CPU)
    compile: bool = _field(False, "torch.compile the model (worth it for long GPU runs)")
    jitter: float = _field(0.2, "colour jitter strength (brightness, contrast, saturation)")
    negatives: str = _field("", "outlier exposure: each step also shows a few photos without a car from this folder, "
                            "pulled towards 'no class' (generated: photo-like negatives carapp makes; default none)")
    negatives_weight: float = _field(0.2, "weight of the outlier-exposure term (0.5 flattened the demo's answers: "
                                     "51%% named)")
    backdrops: float = _field(0.0, "share of the training cars shown on one of the --negatives photos instead of "
                              "their own background (the car's labelled box kept where it was), so that a car found "
                              "in a street of another kind is still named; needs the dataset's boxes (default 0: none)")
    log: str = _field("", "also send each epoch's figures, the config and the test confusion matrix to tensorboard | "
                      "mlflow | wandb, comma-separated for several, each with its package installed (default none)")
    preset: str = "paper"           # the preset the run started from (each command's --preset)

    def __post_init__(self):
        """Refuse values no run can train with (a blank box sent as 0, a typo), with a message that names them."""
        checks = [("epochs", self.epochs >= 1, "at least 1"), ("batch_size", self.batch_size == "auto" or
                                                                          isinstance(self.batch_size, int) and
                                                                          self.batch_size >= 1, "at least 1 or auto"),
                  ("image_size", self.image_size >= 32, "at least 32 pixels (ResNets downsample 32x)"),
                  ("lr", self.lr >= 0, "0 or more"), ("weight_decay", self.weight_decay >= 0, "0 or more"),
                  ("dropout", 0 <= self.dropout < 1, "in [0, 1)"), ("gamma", self.gamma >= 0, "0 or more"),
                  ("patience", self.patience >= 1, "at least 1"), ("workers", self.workers >= 0, "0 or more"),
                  ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
                  ("schedule", self.schedule in SCHEDULES, "plateau or cosine"),
                  ("warmup_epochs", 0 <= self.warmup_epochs < self.epochs, "0 or more and below epochs"),
                  ("optimizer", self.optimizer in OPTIMIZERS, "one of " + ", ".join(OPTIMIZERS)),
                  ("freeze_epochs", 0 <= self.freeze_epochs <= self.epochs, "0 or more and at most epochs"),
                  ("layer_lr_decay", 0 < self.layer_lr_decay <= 1, "in (0, 1]"),
                  ("ema", 0 <= self.ema < 1, "in [0, 1) (0: off)"),
                  ("negatives_weight", self.negatives_weight >= 0, "0 or more"),
                  ("backdrops", 0 <= self.backdrops <= 1 and (self.backdrops == 0 or bool(self.negatives)),
                   "in [0, 1] (0: off), and above 0 only with --negatives (its photos are the backdrops)"),
                  ("resize", self.resize in RESIZES, "one of " + ", ".join(RESIZES)),
                  ("split", self.split in SPLITS, "one of " + ", ".join(SPLITS)),
                  ("log", all(name in TRACKERS for name in tracker_names(self.log)),
                   "empty or one or more of " + ", ".join(TRACKERS) + " (comma-separated)"),
                  ("backbone", self.backbone in BACKBONES, "one of " + ", ".join(BACKBONES))]
        bad = [f"{name} must be {rule} (got {getattr(self, name)!r})" for name, ok, rule in checks if not ok]
        if bad:
            raise ValueError("; ".join(bad))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Presets only set what differs from the paper's recipe; explicit options override them.
PRESETS: dict[str, dict] = {
    "paper": {},
    # Synthetic demo set on a 2-core CPU in minutes: small images, small batches, a short schedule; outlier exposure
    # on generated photo-like negatives, so that real photographs of other things are not named as cartoon cars
    # (bench/trust.py: 2 of 39 real photos given a car instead of 4 of 39 without it, for ~10% more time); 15% of
    # the cars shown on those negatives, so that the cars a detector finds in streets of another kind are named right
    # (bench/detect.py: 91% of the named ones right against 86% without; docs/BENCHMARKS.md "Naming round").
    "demo": dict(image_size=64, batch_size=32, epochs=12, lr=1e-3, lr_patience=1, patience=4,
                 alpha="none", workers=1, jitter=0.1, negatives="generated", backdrops=0.15),
    # Fine-tuning from ImageNet weights at 224 px, assembled from the recipes that reach published fine-grained
    # figures (NVIDIA's ResNet-50, fastai's fine_tune, fine-grained baselines): SGD with Nesterov momentum, one
    # head-only epoch, lower lrs deeper in the trunk, linear warmup then cosine, label smoothing 0.1, no weight decay
    # on norm/bias, EMA weights. Patience 10: a cosine run keeps improving late.
    "finetune": dict(weights="imagenet", optimizer="sgd", lr=0.01, weight_decay=1e-4, decay_norm_bias=False,
                     schedule="cosine", warmup_epochs=1, freeze_epochs=1, layer_lr_decay=0.7, label_smoothing=0.1,
                     ema=0.9998, epochs=30, patience=10),
}


def train_options() -> list[dataclasses.Field]:
    """The training options, in declaration order: TrainConfig's fields that carry option() metadata (read when
    called, so a TrainConfig extended later is what every face shows)."""
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata]


def option_flag(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def options_table() -> str:
    """The training options as a Markdown table (docs/TRAINING_OPTIONS.md is this, written by a test's check)."""
    rows = ["| flag | default | what it does | Train form |", "|---|---|---|---|"]
    for f in train_options():
        shown = f.metadata["form"] and f"{f.metadata['form']}: {f.metadata['label']}"
        text = f.metadata["help"].replace("%%", "%").replace("|", "\\|")
        rows.append(f"| `{option_flag(f)}` | `{f.default!r}` | {text} | {shown or ''} |")
    return "\n".join(rows) + "\n"


def make_config(preset: str = "paper", **overrides) -> TrainConfig:
    """The paper's recipe, then the preset, then explicit overrides (None means 'not given')."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    if not values.get("negatives") and overrides.get("backdrops") is None:
        values.pop("backdrops", None)  # --negatives "" turns off a preset's backdrops with its outlier exposure
    return TrainConfig(preset=preset, **values)
