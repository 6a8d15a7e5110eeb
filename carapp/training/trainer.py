"""What a run trains with, built from its config (and last.pt when resuming): the network and what its forward pass
goes through (DDP, torch.compile), the focal loss, optimizer, schedule, grad scaler and weight average, the loaders,
and the counters last.pt keeps. `Trainer.step` is one optimizer step; `Meter` the running figures of one pass.
Shared by the training loop (train.py) and the learning-rate range test (lrfind.py)."""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch

from ..config import TrainConfig
from ..dataset.loader import EpochSampler, make_loader, split_images, to_input
from ..dataset.negatives import Backdrops
from ..dataset.split import Split
from ..losses import FocalLoss, class_alpha
from ..model import build_model
from ..runtime import Dist, autocast, describe_device, needs_grad_scaler, pick_device
from .negatives import Negatives, uniform_loss
from .optim import make_ema, make_optimizer, make_scheduler

log = logging.getLogger("carapp")


@dataclass
class Meter:
    """Sums over the samples of one pass so far: their mean loss and accuracy. Plain numbers, so that a pass stopped
    midway goes into last.pt (`asdict`) and on from there (`Meter(**saved)`)."""
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0

    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += loss.item() * len(labels)
        self.correct += (logits.argmax(1) == labels).sum().item()
        self.seen += len(labels)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def acc(self) -> float:
        return self.correct / max(self.seen, 1)

    def summed(self, dist: Dist, device: torch.device) -> "Meter":
        """The same figures summed over every rank (one process: itself)."""
        loss_sum, correct, seen = dist.sum([self.loss_sum, self.correct, self.seen], device)
        return Meter(loss_sum, correct, seen, self.seconds)

    def state_dict(self) -> dict:
        return asdict(self)


class Trainer:
    """Everything a run trains with; `state` is what the loop advances and last.pt saves (epoch, step, the stopped
    pass's meter, best val loss, epochs without improvement)."""

    def __init__(self, cfg: TrainConfig, split: Split, ckpt: dict | None, dist: Dist):
        self.cfg, self.split, self.dist = cfg, split, dist  # split kept: a halved batch rebuilds the loaders
        self.device = pick_device(cfg.device)
        if self.device.type == "cuda" and dist.world > 1:
            self.device = torch.device("cuda", dist.local_rank)
        torch.manual_seed(cfg.seed)
        self.net = build_model(cfg.backbone, len(split.class_info), cfg.dropout, None if ckpt else cfg.weights)
        self.net.to(self.device)
        if cfg.channels_last and self.device.type == "cuda":
            self.net = self.net.to(memory_format=torch.channels_last)
        self.criterion = FocalLoss(class_alpha(split.counts("train"), cfg.alpha), cfg.gamma,
                                   label_smoothing=cfg.label_smoothing).to(self.device)
        self.optimizer = make_optimizer(self.net, cfg)
        # made once: a halved batch rebuilds the loaders, not the list of backdrops
        self.backdrops = Backdrops(cfg.negatives, cfg.backdrops) if cfg.backdrops else None
        self.build_loaders()
        self.negatives = Negatives(cfg, dist.rank) if cfg.negatives else None
        if self.negatives:
            log.info("outlier exposure: %d photos without a car (%s), %d a step, weight %g", len(self.negatives),
                     cfg.negatives, self.negatives.per_batch, cfg.negatives_weight)
        self.scheduler = make_scheduler(self.optimizer, cfg, len(self.train_loader))
        self.scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(self.device, cfg.amp))
        self.state = {"epoch": 0, "step": 0, "partial": None, "best_val_loss": math.inf, "bad_epochs": 0}
        if ckpt:
            self.restore(ckpt)
        self.ema = make_ema(self.net, cfg.ema)  # a copy of the (restored) weights, then its own saved average
        if self.ema is not None and ckpt and ckpt.get("ema"):
            self.ema.load_state_dict(ckpt["ema"])
        self.trunk_params = [p for name, p in self.net.named_parameters() if not name.startswith("fc.")]
        self.model = self.net  # what the forward pass goes through: maybe DDP, maybe compiled
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.model = DistributedDataParallel(self.net, device_ids=[self.device.index] if
                                                 self.device.type == "cuda" else None)
        if cfg.compile:
            self.model = torch.compile(self.model)

    def build_loaders(self) -> None:
        cfg, dist = self.cfg, self.dist
        backdrops = self.backdrops
        train_set = split_images(cfg, self.split, "train", train=True, backdrops=backdrops)
        if backdrops:
            log.info("backdrops: %.0f%% of the training cars shown on %d photos without a car (%s); %d of %d "
                     "training photos have the box it needs", 100 * cfg.backdrops, len(backdrops), cfg.negatives,
                     train_set.boxed(), len(train_set))
        num_samples = cfg.steps_per_epoch * cfg.batch_size * dist.world if cfg.steps_per_epoch else len(train_set)
        self.sampler = EpochSampler(train_set.labels, cfg.sampler == "weighted", num_samples, cfg.seed, dist.rank,
                                    dist.world)
        if train_set.cache:
            log.info("reading pre-resized images from %s", train_set.cache.folder)
        pin = self.device.type == "cuda"
        self.train_loader = make_loader(train_set, cfg.batch_size, cfg.workers, self.sampler, pin)
        val_set = split_images(cfg, self.split, "val")
        shard = list(range(dist.rank, len(val_set), dist.world)) if dist.world > 1 else None
        self.val_loader = make_loader(val_set, cfg.batch_size, cfg.workers, shard, pin)
        log.info("%d classes, %d train / %d val images, %s, %s%s", len(self.split.class_info), len(train_set),
                 len(val_set), cfg.backbone, describe_device(self.device),
                 f", {dist.world} processes" if dist.world > 1 else "")

    def restore(self, ckpt: dict) -> None:
        """Continue from last.pt: weights, optimizer, schedule, counters, the random streams mid-epoch."""
        self.net.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.state.update({k: ckpt[k] for k in self.state})
        torch.set_rng_state(ckpt["rng"])  # dropout's stream, mid-epoch; augmentation seeds come from the sampler
        if ckpt.get("scaler"):  # fp16 on older GPUs: the loss scale goes on where it was
            self.scaler.load_state_dict(ckpt["scaler"])
        if ckpt.get("cuda_rng") and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["cuda_rng"][0], self.device)

    def checkpoint(self) -> dict:
        """What last.pt holds besides the config and labels: enough to continue exactly."""
        cuda = self.device.type == "cuda"
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state(),
                "cuda_rng": [torch.cuda.get_rng_state(self.device)] if cuda else [],
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "ema": self.ema.state_dict() if self.ema is not None else {}, **self.state}

    def forward(self, images: torch.Tensor, labels: torch.Tensor, net: torch.nn.Module | None = None,
                negatives: torch.Tensor | None = None):
        """(logits, labels on the device, loss) of a batch: the focal loss, plus the outlier-exposure term when
        `negatives` (photos without a car) come along, in the same forward pass. `net` instead of the training
        forward (validation goes through the bare network: ranks see different numbers of batches)."""
        x = images if negatives is None else torch.cat([images, negatives])
        x, labels = to_input(x, self.device, self.cfg.channels_last), labels.to(self.device, non_blocking=True)
        with autocast(self.device, self.cfg.amp):
            outputs = (net or self.model)(x)
        logits = outputs[:len(labels)]
        loss = self.criterion(logits, labels)
        if negatives is not None:
            loss = loss + self.cfg.negatives_weight * uniform_loss(outputs[len(labels):])
        return logits, labels, loss

    def step(self, loss: torch.Tensor, frozen: bool = False) -> None:
        """Backward and one optimizer step (grad scaler on fp16), then the weight average and a per-step schedule.
        Frozen: the trunk gets no gradient, so no step either (optimizers skip a None grad, weight decay too)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if frozen:
            for param in self.trunk_params:
                param.grad = None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update_parameters(self.net)
        if self.cfg.schedule == "cosine":
            self.scheduler.step()
