"""The fine-tuning recipe options: optimizer and its parameter groups, frozen-trunk epochs, EMA weights, letterbox
resizing, the finetune preset from a torchvision-format .pth, lr-find and --batch-size auto (tiny images, ResNet-18,
CPU; the GPU's out-of-memory errors simulated)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from conftest import cli_json
from PIL import Image

from carapp.checkpoint import load_checkpoint
from carapp.config import make_config
from carapp.model import build_model
from carapp.rundir import read_metrics

FAST = ["--backbone", "resnet18", "--image-size", "32", "--batch-size", "8", "--workers", "0"]


def test_recipe_options_are_validated_naming_the_field():
    for field, value in (("optimizer", "rmsprop"), ("ema", 1.0), ("resize", "stretch"), ("freeze_epochs", 5),
                         ("layer_lr_decay", 0.0)):
        with pytest.raises(ValueError, match=field):
            make_config("demo", epochs=4, **{field: value})


def test_default_optimizer_is_the_papers_adam_in_one_group():
    from carapp.training.optim import make_optimizer
    cfg = make_config("paper")
    net = build_model("resnet18", 5)
    opt = make_optimizer(net, cfg)
    assert type(opt) is torch.optim.Adam and len(opt.param_groups) == 1
    assert opt.param_groups[0]["weight_decay"] == cfg.weight_decay and opt.param_groups[0]["lr"] == cfg.lr


def test_no_decay_on_norm_and_bias_and_layer_wise_lrs():
    from carapp.training.optim import make_optimizer
    cfg = make_config("paper", optimizer="sgd", lr=0.1, weight_decay=1e-4, decay_norm_bias=False,
                      layer_lr_decay=0.5)
    net = build_model("resnet18", 5)
    opt = make_optimizer(net, cfg)
    assert type(opt) is torch.optim.SGD
    assert all(g["momentum"] == 0.9 and g["nesterov"] for g in opt.param_groups)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert len(group_of) == len(list(net.parameters()))  # every parameter in exactly one group
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for p in [m.weight for m in norms] + [m.bias for m in norms] + [net.fc.bias]:
        assert group_of[id(p)]["weight_decay"] == 0.0
    for p in (net.conv1.weight, net.layer3[0].conv1.weight, net.fc.weight):
        assert group_of[id(p)]["weight_decay"] == 1e-4
    assert opt.param_groups[0]["name"] == "head" and opt.param_groups[0]["lr"] == 0.1  # the lr metrics report
    lr_of = {name: group_of[id(p)]["lr"] for name, p in net.named_parameters()}
    assert lr_of["fc.weight"] == 0.1 and lr_of["layer4.0.conv1.weight"] == pytest.approx(0.05)
    assert lr_of["layer1.0.conv1.weight"] == pytest.approx(0.1 * 0.5 ** 4)
    assert lr_of["conv1.weight"] == lr_of["bn1.weight"] == pytest.approx(0.1 * 0.5 ** 5)
    assert type(make_optimizer(net, make_config("paper", optimizer="adamw"))) is torch.optim.AdamW


def test_the_better_validating_weights_are_chosen(monkeypatch):
    """With EMA on, whichever of raw and averaged weights has the lower val loss is used and recorded."""
    from carapp.training import train as train_module
    raw, averaged = object(), object()
    trainer = SimpleNamespace(net=raw, ema=SimpleNamespace(module=averaged))
    for ema_loss, want in ((0.5, "ema"), (1.5, "raw")):
        monkeypatch.setattr(train_module, "validate", lambda trainer, net=None, e=ema_loss:
                            (1.0, 0.3) if net is None else (e, 0.4))
        loss, acc, chosen, row = train_module.validate_weights(trainer)
        assert row == {"raw_val_loss": 1.0, "ema_val_loss": ema_loss, "val_weights": want}
        assert (loss, acc, chosen) == ((0.5, 0.4, averaged) if want == "ema" else (1.0, 0.3, raw))


@pytest.mark.slow
def test_ema_weights_differ_from_raw_and_best_pt_holds_the_chosen_ones(demo_root, tmp_path):
    run = tmp_path / "ema"
    cli_json("train", "--data", demo_root, "--run-dir", run, "--epochs", "1", "--steps-per-epoch", "3", "--ema",
             "0.5", "--lr", "0.01", *FAST)
    (row,) = read_metrics(run)
    assert row["val_weights"] in ("ema", "raw")
    assert row["val_loss"] == min(row["raw_val_loss"], row["ema_val_loss"])
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    ema = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert last["ema"]["n_averaged"].item() == 3 and ema.keys() == last["model"].keys()
    assert not torch.equal(ema["fc.weight"], last["model"]["fc.weight"])
    chosen = ema if row["val_weights"] == "ema" else last["model"]
    assert all(torch.equal(best["model"][k], chosen[k]) for k in chosen)  # evaluate and predict read best.pt
    assert json.loads((run / "config.json").read_text())["ema"] == 0.5


def _torchvision_pth(path: Path) -> Path:
    """A torchvision-format ResNet-18 state dict (ImageNet's 1000-class head), as a user downloads one."""
    torch.manual_seed(123)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def _trunk(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


@pytest.mark.slow
def test_finetune_preset_from_a_pth_freezes_the_trunk_for_one_epoch_then_trains_it(demo_root, tmp_path,
                                                                                   monkeypatch):
    """The finetune preset end to end from a .pth: epoch 1 trains only the head (trunk tensors, BN statistics
    included, stay the .pth's), epoch 2 the whole network, across a stop after epoch 1 and a resume."""
    from carapp import rundir
    from carapp.predict import Predictor
    from carapp.training.train import train
    pth = _torchvision_pth(tmp_path / "resnet18.pth")
    cfg = make_config("finetune", data=str(demo_root), weights=str(pth), backbone="resnet18", image_size=32,
                      batch_size=8, epochs=2, steps_per_epoch=2, workers=0)
    calls = []  # asked once per step and once after each epoch: the 3rd ask is the end of epoch 1
    monkeypatch.setattr(rundir, "stop_requested", lambda run: calls.append(1) or len(calls) == 3)
    run = tmp_path / "ft"
    assert train(cfg, run)["status"] == "stopped"
    monkeypatch.undo()
    after_one = load_checkpoint(run / "last.pt")
    assert after_one["epoch"] == 1
    pretrained = torch.load(pth, weights_only=True)
    assert all(torch.equal(v, pretrained[k]) for k, v in _trunk(after_one["model"]).items())
    torch.manual_seed(cfg.seed)  # the head the trainer started from: the same seed, the same draws
    labels = json.loads((run / "labels.json").read_text())
    start = build_model("resnet18", len(labels), cfg.dropout, str(pth)).state_dict()
    assert not torch.equal(after_one["model"]["fc.weight"], start["fc.weight"])
    assert train(cfg, run, resume=True)["status"] == "finished"
    after_two = load_checkpoint(run / "last.pt")
    changed = [k for k, v in _trunk(after_two["model"]).items() if v.is_floating_point() and
               not torch.equal(v, pretrained[k])]
    assert "conv1.weight" in changed and "layer4.1.conv2.weight" in changed
    config = json.loads((run / "config.json").read_text())
    assert (config["optimizer"], config["freeze_epochs"], config["decay_norm_bias"], config["schedule"]) == \
        ("sgd", 1, False, "cosine")
    assert (run / "test_metrics.json").is_file()
    assert Predictor.load(run).predict(Image.new("RGB", (60, 40), "red"), cam=False).top


def _wide_photo() -> Image.Image:
    """A 4:1 photo: blue in the middle, red over the left and right eighths."""
    photo = Image.new("RGB", (320, 80), (0, 0, 255))
    for box in ((0, 0, 40, 80), (280, 0, 320, 80)):
        photo.paste((255, 0, 0), box)
    return photo


def _red_columns(tensor: torch.Tensor) -> int:
    return int(((tensor[0] > 200) & (tensor[2] < 60)).any(0).sum())


def test_pad_keeps_a_wide_photos_ends_and_crop_loses_them():
    from carapp.dataset.loader import build_transform
    photo = _wide_photo()
    padded, cropped = build_transform(64, False, resize="pad")(photo), build_transform(64, False)(photo)
    assert padded.shape == cropped.shape == (3, 64, 64)
    assert _red_columns(padded) >= 10 and _red_columns(cropped) == 0
    assert padded[:, 0, 32].tolist() == [124, 116, 104]  # the band above the photo: the mean colour
    assert build_transform(64, True, resize="pad")(photo).shape == (3, 64, 64)


@pytest.mark.slow
def test_a_pad_run_predicts_evaluates_and_exports_with_the_pad_transform(demo_root, tmp_path):
    from carapp.predict import Predictor
    run = tmp_path / "pad"
    cli_json("train", "--data", demo_root, "--run-dir", run, "--epochs", "1", "--steps-per-epoch", "1", "--resize",
             "pad", *FAST)
    assert json.loads((run / "config.json").read_text())["resize"] == "pad"
    predictor = Predictor.load(run)
    assert _red_columns(predictor.transform(_wide_photo())) >= 5
    result = predictor.predict(_wide_photo(), top_k=2, cam=True)
    assert result.cam.size[0] == 4 * result.cam.size[1]  # the heatmap over the whole wide photo
    out = cli_json("export", "--run", run, "--format", "safetensors", "--out", tmp_path / "exported")
    prep = json.loads((Path(out["out"]) / "config.json").read_text())["preprocessing"]
    assert prep["resize"] == "pad" and prep["resize_long_side"] == prep["pad_to_square"] == 32
    exported = Predictor.load(out["out"])
    assert exported.resize == "pad"
    assert exported.predict(_wide_photo(), cam=False).top == predictor.predict(_wide_photo(), cam=False).top


def _recipe_config(demo_root):
    return make_config("paper", data=str(demo_root), backbone="resnet18", image_size=32, batch_size=8, epochs=3,
                       steps_per_epoch=3, workers=0, patience=10, optimizer="adamw", decay_norm_bias=False,
                       layer_lr_decay=0.5, freeze_epochs=1, ema=0.9, schedule="cosine", warmup_epochs=1,
                       resize="pad")


@pytest.mark.slow
def test_a_recipe_run_stopped_mid_epoch_resumes_exactly(demo_root, tmp_path, monkeypatch):
    """Every recipe option at once (adamw groups, frozen first epoch, EMA, cosine, pad), stopped in epoch 2 after
    the unfreeze and resumed: the same raw and EMA val losses as the run that was never stopped."""
    from carapp import rundir
    from carapp.training.train import train
    train(_recipe_config(demo_root), tmp_path / "straight")
    calls = []  # epoch 1: asks 1-3 and 4 at its end; epoch 2: ask 6 is after its step 2
    monkeypatch.setattr(rundir, "stop_requested", lambda run: calls.append(1) or len(calls) == 6)
    assert train(_recipe_config(demo_root), tmp_path / "stopped")["status"] == "stopped"
    monkeypatch.undo()
    assert train(_recipe_config(demo_root), tmp_path / "stopped", resume=True)["status"] == "finished"
    keys = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "raw_val_loss", "ema_val_loss",
            "val_weights")
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "stopped")
    assert [{k: m[k] for k in keys} for m in resumed] == [{k: m[k] for k in keys} for m in straight]


def test_lr_suggestion_is_the_steepest_descent_before_the_minimum():
    """A textbook range-test curve: flat, a descent steepest at 1e-3, a minimum at 1e-2, then divergence."""
    from carapp.training.lrfind import suggest_lr
    lrs = list(np.logspace(-6, 0, 61))
    x = np.log10(lrs)
    losses = list(2.0 - np.tanh(2 * (x + 3)) + np.where(x > -2, 8 * (x + 2) ** 2, 0.0))
    suggested, at_min = suggest_lr(lrs, losses)
    assert suggested == pytest.approx(1e-3, rel=0.3) and at_min == pytest.approx(1e-2, rel=0.3)
    assert suggest_lr([1e-4, 1e-3, 1e-2], [1.0, 0.5, 3.0]) == (pytest.approx(1e-4), 1e-3)  # too short: min / 10


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".venv" not in p.parts)


@pytest.mark.slow
def test_lr_find_sweeps_exponentially_stops_on_divergence_and_writes_no_run(demo_root):
    repo = Path(__file__).parents[1]
    before, data_before = _listing(repo / "checkpoints"), _listing(demo_root)
    result = cli_json("lr-find", "--data", demo_root, *FAST, "--steps", "40", "--start-lr", "1e-5", "--end-lr", "100")
    lrs, losses = result["lrs"], result["losses"]
    assert len(lrs) == len(losses) == len(result["raw_losses"]) == result["steps"] <= 40
    assert lrs[0] == pytest.approx(1e-5) and np.allclose(np.diff(np.log(lrs)), np.log(100 / 1e-5) / 39)
    assert result["diverged"] and result["steps"] < 40  # lr 100 blows the loss up well before the end
    assert lrs[0] <= result["suggested_lr"] <= result["min_loss_lr"] <= lrs[-1]
    assert _listing(repo / "checkpoints") == before and _listing(demo_root) == data_before


def _out_of_memory_above(limit: int, tried: list):
    def trial(size):
        tried.append(size)
        if size > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory at {size}")
    return trial


def test_auto_batch_size_halves_until_the_trial_steps_fit(monkeypatch):
    from carapp import runtime
    from carapp.training import autobatch
    tried = []
    assert autobatch.largest_fitting(_out_of_memory_above(200, tried)) == 128
    assert tried == [1024, 512, 256, 128]
    with pytest.raises(torch.cuda.OutOfMemoryError, match="not even a batch of 1"):
        autobatch.largest_fitting(_out_of_memory_above(0, []))
    # the CUDA path of a config, with the GPU's trial steps faked: the size found replaces "auto"
    tried = []
    monkeypatch.setattr(runtime, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(autobatch, "trial_steps", lambda cfg, n, device, size: _out_of_memory_above(100, tried)(size))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "a fake GPU")
    cfg = autobatch.resolve_batch_size(make_config("paper", batch_size="auto"), 10)
    assert cfg.batch_size == 64 and tried == [1024, 512, 256, 128, 64]


@pytest.mark.slow
def test_auto_batch_size_on_a_cpu_trains_at_the_papers_batch(demo_root, tmp_path, caplog):
    from carapp.cli import build_parser, config_from_args
    from carapp.training.train import train
    args = build_parser().parse_args(["train", "--data", str(demo_root), "--run-dir", "x", "--batch-size", "auto"])
    assert config_from_args(args).batch_size == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--batch-size", "many"])
    with pytest.raises(ValueError, match="batch_size"):
        make_config("paper", batch_size="lots")
    cfg = make_config("paper", data=str(demo_root), backbone="resnet18", image_size=32, batch_size="auto", epochs=1,
                      steps_per_epoch=1, workers=0, device="cpu")
    with caplog.at_level("INFO", logger="carapp"):
        assert train(cfg, tmp_path / "auto")["status"] == "finished"
    assert "--batch-size auto: no CUDA device (cpu), using batch size 64" in caplog.text
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["batch_size"] == 64


@pytest.mark.slow
def test_an_out_of_memory_error_halves_an_auto_batch_and_goes_on_from_the_last_good_step(demo_root, tmp_path,
                                                                                        monkeypatch, caplog):
    """Steps 1-2 at batch 16 fit, step 3 runs out of memory: the epoch goes on at batch 8 from sample 32, so two
    more batches of 8 finish its 48 samples, and the run's config.json holds the new size."""
    from carapp.training import train as train_module
    from carapp.training import trainer as trainer_module
    from carapp.training.train import train
    sizes, real_to_input = [], trainer_module.to_input

    def to_input(images, device, channels_last=False):
        if torch.is_grad_enabled():  # training steps only: validation runs under no_grad
            sizes.append(len(images))
        if len(images) == 16 and len(sizes) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_to_input(images, device, channels_last)
    monkeypatch.setattr(trainer_module, "to_input", to_input)
    cfg = make_config("paper", data=str(demo_root), backbone="resnet18", image_size=32, batch_size=16, epochs=1,
                      steps_per_epoch=3, workers=0, schedule="cosine", batch_size_auto=True)
    with caplog.at_level("WARNING", logger="carapp"):
        assert train(cfg, tmp_path / "oom")["status"] == "finished"
    assert sizes == [16, 16, 16, 8, 8]
    assert "GPU out of memory at batch size 16 in epoch 1: going on at batch size 8 from step 5" in caplog.text
    config = json.loads((tmp_path / "oom" / "config.json").read_text())
    assert (config["batch_size"], config["steps_per_epoch"]) == (8, 6)
    assert read_metrics(tmp_path / "oom")[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine ended on time
    monkeypatch.setattr(trainer_module, "to_input", lambda images, *a, **k: (_ for _ in ()).throw(
        torch.cuda.OutOfMemoryError("simulated")))
    with pytest.raises(train_module.TrainingError, match="resume with a smaller batch"):  # a fixed batch: as before
        train(make_config("paper", data=str(demo_root), backbone="resnet18", image_size=32, batch_size=16, epochs=1,
                          steps_per_epoch=3, workers=0), tmp_path / "fixed")
