"""Answers a user can trust: the numerical core behind "how sure is the network, and should we say so?".

- Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") turns overconfident softmax
  outputs into probabilities that mean what they say; `ece` and `reliability_bins` measure how well that worked.
- Acceptance thresholds choose, from validation data, the confidence above which answers reach a target accuracy
  (selective classification), for the exact model and, with probabilities summed per make, for the make alone.
- `FarScore` says how far a photo lies from every training car, from several depths of the network (the early
  stages' channel statistics, `StageGaussians`; the layer3 nearest neighbours, `FeatureBank`; the logits' energy),
  so that a photo of a dog is answered "no car" instead of a confident model name.
- `answer_status` combines all three into one of STATUSES.

Everything here is numpy/scipy/scikit-learn on arrays: no torch, no gradio, so callers decide where the logits and
features come from.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp
from scipy.stats import norm
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

ECE_BINS = 15
STATUSES = ("model", "make", "unsure", "no-car")

# Bounds on the temperature; beyond them the fit is chasing noise (or the logits are broken), not calibrating.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
# Keys of a saved FeatureBank; a file missing any of them is not one.
BANK_KEYS = ("bank", "k")


# ---------------------------------------------------------------------------------------------- calibration


def _as_logits(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, C), not shape {logits.shape}")
    return logits


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, (N, C) float64; log-sum-exp keeps large logits finite."""
    return np.exp(log_softmax(_as_logits(logits) / float(temperature), axis=1))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under softmax(logits / temperature)."""
    log_p = log_softmax(_as_logits(logits) / float(temperature), axis=1)
    labels = np.asarray(labels, dtype=np.int64)
    return float(-log_p[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising validation NLL of softmax(logits / T); 1.0 when there is nothing to fit.

    The search runs over log T so that 0.5 and 2 are equally far from 1, within [MIN_TEMPERATURE, MAX_TEMPERATURE].
    """
    logits, labels = _as_logits(logits), np.asarray(labels, dtype=np.int64)
    if len(logits) < 2 or len(labels) != len(logits) or not np.isfinite(logits).all():
        return 1.0
    if np.ptp(logits, axis=1).max() == 0:  # every row flat: NLL does not depend on T
        return 1.0
    result = minimize_scalar(lambda log_t: nll(logits, labels, np.exp(log_t)), method="bounded",
                             bounds=(np.log(MIN_TEMPERATURE), np.log(MAX_TEMPERATURE)))
    if not result.success or not np.isfinite(result.x):
        return 1.0
    return float(np.exp(result.x))


def _confidence_and_correct(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probs must be (N, C) with one label per row; got {probs.shape} and {len(labels)} labels")
    return probs.max(axis=1), probs.argmax(axis=1) == np.asarray(labels)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> list[dict]:
    """Equal-width bins (lo, hi] on top-1 confidence, with the mean confidence and accuracy of each.

    Confidence 0 joins the first bin. `confidence` and `accuracy` are None for an empty bin.
    """
    confidence, correct = _confidence_and_correct(probs, labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted on the very edges reported as lo/hi, so a confidence on an edge lands where the bins say
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        members = index == b
        count = int(members.sum())
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count,
                     "confidence": float(confidence[members].mean()) if count else None,
                     "accuracy": float(correct[members].mean()) if count else None})
    return bins


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over bins of count / N * |accuracy - confidence|."""
    bins = reliability_bins(probs, labels, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        raise ValueError("ECE of no samples is undefined")
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


def make_probs(probs: np.ndarray, class_makes: list[str]) -> tuple[list[str], np.ndarray]:
    """Probability of each make: the sum of its models' probabilities. Makes in first-seen order, (N, M)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(class_makes):
        raise ValueError(f"probs has {probs.shape[-1]} classes but class_makes names {len(class_makes)}")
    makes = list(dict.fromkeys(class_makes))
    column = {make: i for i, make in enumerate(makes)}
    membership = np.zeros((len(class_makes), len(makes)))  # (C, M) one-hot: one matrix product sums them all
    membership[np.arange(len(class_makes)), [column[m] for m in class_makes]] = 1.0
    return makes, probs @ membership


# ---------------------------------------------------------------------------------------- selective answers


def _sorted_by_confidence(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=bool).ravel()
    if len(confidence) != len(correct):
        raise ValueError(f"{len(confidence)} confidences but {len(correct)} correctness flags")
    order = np.argsort(-confidence, kind="stable")
    return confidence[order], correct[order]


def wilson_lower(right: np.ndarray, n: np.ndarray, z: float) -> np.ndarray:
    """Lower end of the Wilson score interval for right/n successes, with z standard errors (one-sided)."""
    p = right / n
    centre = p + z * z / (2 * n)
    margin = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - margin) / (1 + z * z / n)


def accept_threshold(confidence: np.ndarray, correct: np.ndarray, target_accuracy: float,
                     confidence_level: float | None = None) -> float:
    """The lowest threshold t whose accepted answers (confidence >= t) are right at least `target_accuracy` of the time.

    Lowest t means largest coverage; the accuracy is not monotone in t, so every candidate is checked. With
    `confidence_level` (e.g. 0.9), the accuracy must reach the target with that confidence: the one-sided Wilson
    lower bound, not the observed share, is compared, so that a few hundred validation images with a handful of
    errors do not set a threshold that new photos miss. Returns 1.0 (accept only certainty) when no threshold
    reaches the target.
    """
    confidence, correct = _sorted_by_confidence(confidence, correct)
    if len(confidence) == 0:
        return 1.0
    accepted = np.arange(1, len(confidence) + 1)
    right = np.cumsum(correct)
    # a threshold accepts every answer with the same confidence at once: only the last of each tie is a candidate
    candidate = np.append(confidence[1:] != confidence[:-1], True)
    if confidence_level is None:
        meets = candidate & (right >= target_accuracy * accepted - 1e-9)  # tolerance: 0.9 * 10 is not exactly 9
    else:
        z = float(norm.ppf(confidence_level))
        meets = candidate & (wilson_lower(right, accepted, z) >= target_accuracy - 1e-12)
    if not meets.any():
        return 1.0
    threshold = confidence[np.flatnonzero(meets)[-1]]
    return float(np.clip(threshold, np.finfo(np.float64).tiny, 1.0))


def coverage_curve(confidence: np.ndarray, correct: np.ndarray, n_points: int = 101) -> list[dict]:
    """Coverage and selective accuracy at evenly spaced thresholds in [0, 1], for plotting the trade-off."""
    ascending, correct_ascending = (a[::-1] for a in _sorted_by_confidence(confidence, correct))
    # right_from[i]: correct answers among the i-th lowest confidence and above
    right_from = np.append(np.cumsum(correct_ascending[::-1])[::-1], 0)
    # rounded so that a grid point is the float a person would type (linspace gives 0.7000000000000001)
    thresholds = np.round(np.linspace(0.0, 1.0, n_points), 12)
    first_accepted = np.searchsorted(ascending, thresholds, side="left")
    n = len(ascending)
    curve = []
    for t, i in zip(thresholds, first_accepted):
        accepted = n - i
        curve.append({"threshold": float(t), "coverage": accepted / n if n else 0.0,
                      "accuracy": float(right_from[i] / accepted) if accepted else None})
    return curve


def selective_metrics(confidence: np.ndarray, correct: np.ndarray, threshold: float) -> dict:
    """Coverage (share of answers with confidence >= threshold) and their accuracy (None if none accepted)."""
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=bool).ravel()
    accepted = confidence >= threshold
    return {"coverage": float(accepted.mean()) if len(confidence) else 0.0,
            "selective_accuracy": float(correct[accepted].mean()) if accepted.any() else None}


# ---------------------------------------------------------------------------------------- out of distribution


def _l2_normalize(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)  # an all-zero feature vector stays zero instead of NaN


class StageGaussians:
    """One Gaussian per early stage of the network over that stage's channel statistics (each channel's mean and
    standard deviation over the photo: the colours, contrasts and textures the stage responds to, as in Gram-matrix
    and feature-statistics OOD detectors, Sastry & Oore 2020, Lee et al. 2018), fitted on training cars with a
    Ledoit-Wolf covariance; the score of a stage is the squared Mahalanobis distance to its Gaussian.

    Why early stages: a photo of another kind (a real cat before a model trained on drawn cars) differs most in
    low-level statistics, while the last layers may still map it onto a class. Measured on a demo-preset model
    trained without outlier exposure (bench/trust.py, docs/BENCHMARKS.md): layer1 alone refuses 77% of 31 real
    photographs at its 99%-of-validation-cars point, the layer3 k-NN 77%, FarScore's combination 94%.
    """

    def __init__(self, widths: list[int], means: list[np.ndarray], whitens: list[np.ndarray]):
        """`whitens`: per stage, L with L L^T the precision (so a distance is |(x - mean) L|), held as float32
        exactly as saved: a loaded file scores as the fitted one did."""
        self.widths = [int(w) for w in widths]
        self.means = [np.asarray(m, dtype=np.float32) for m in means]
        self.whitens = [np.asarray(w, dtype=np.float32) for w in whitens]
        for w, m, l in zip(self.widths, self.means, self.whitens, strict=True):
            if m.shape != (2 * w,) or l.shape != (2 * w, 2 * w) or not np.isfinite(l).all():
                raise ValueError(f"a stage of {w} channels needs a mean of ({2 * w},) and a finite whitening of "
                                 f"({2 * w}, {2 * w}); got {m.shape} and {l.shape}")

    @property
    def dim(self) -> int:
        return 2 * sum(self.widths)

    @classmethod
    def fit(cls, stats: np.ndarray, widths: list[int]) -> StageGaussians:
        stats = np.asarray(stats, dtype=np.float64)
        if stats.ndim != 2 or stats.shape[1] != 2 * sum(widths) or len(stats) < 2:
            raise ValueError(f"need (N >= 2, {2 * sum(widths)}) channel statistics; got {stats.shape}")
        means, whitens = [], []
        for part in cls._parts(stats, widths):
            means.append(part.mean(0))
            covariance = LedoitWolf(assume_centered=False).fit(part).covariance_
            # a channel that never fires (a dead ReLU) has no variance: a small ridge keeps its inverse finite
            covariance += np.eye(len(covariance)) * max(1e-6 * np.trace(covariance) / len(covariance), 1e-12)
            # with C = K K^T (Cholesky), L = K^-T gives L L^T = C^-1: the precision, never formed
            whitens.append(np.linalg.inv(np.linalg.cholesky(covariance)).T)
        return cls(widths, means, whitens)

    @staticmethod
    def _parts(stats: np.ndarray, widths: list[int]) -> list[np.ndarray]:
        edges = np.cumsum([0] + [2 * w for w in widths])
        return [stats[:, a:b] for a, b in zip(edges[:-1], edges[1:])]

    def score(self, stats: np.ndarray) -> np.ndarray:
        """(N, stages) squared Mahalanobis distances, larger = less like the training cars."""
        stats = np.asarray(stats, dtype=np.float64)
        if stats.ndim != 2 or stats.shape[1] != self.dim:
            raise ValueError(f"channel statistics must be (N, {self.dim}); got shape {stats.shape}")
        return np.stack([(((part - mean) @ whiten.astype(np.float64)) ** 2).sum(1) for part, mean, whiten in
                         zip(self._parts(stats, self.widths), self.means, self.whitens)], axis=1)


def _load_arrays(path: str | os.PathLike, keys: tuple[str, ...], what: str) -> dict[str, Any]:
    """The arrays of an .npz written by save(); never unpickles (an object array is refused)."""
    if not zipfile.is_zipfile(path):  # also refuses a bare .npy, which np.load would return as one array
        raise ValueError(f"{path} is not a {what} file (an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays: dict[str, Any] = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(f"{path} is not a readable {what} file: {exc}") from None
    missing = [key for key in keys if key not in arrays]
    if missing:
        raise ValueError(f"{path} is not a {what} file: missing {', '.join(missing)}")
    return arrays


class FeatureBank:
    """k-nearest-neighbour "not a car" score (Sun et al. 2022, "Out-of-distribution detection with deep nearest
    neighbors"): one minus the cosine similarity of an image's L2-normalised features to its k-th nearest training
    image. Larger = less like any training car.

    carapp feeds it the pooled layer3 features. Measured on a demo-preset ResNet-50 (test cars against 300 synthetic
    photos without a car, bench/trust.py): AUROC 0.99 for k=5 on layer3, 0.96 on layer4 (pooled penultimate),
    0.95 for a class-conditional Mahalanobis on layer4, 0.81 for max-softmax.
    """

    def __init__(self, bank: np.ndarray, k: int = 5):
        # held at the float16 precision it is saved in: a loaded bank scores exactly as the one that set thresholds
        self.bank = _l2_normalize(np.asarray(bank, dtype=np.float32)).astype(np.float16).astype(np.float32)
        self.k = int(k)
        if self.bank.ndim != 2 or not 1 <= self.k <= len(self.bank):
            raise ValueError(f"a feature bank needs a (N, D) array with N >= k = {self.k}; got {self.bank.shape}")

    @property
    def dim(self) -> int:
        return self.bank.shape[1]

    @classmethod
    def fit(cls, features: np.ndarray, k: int = 5) -> FeatureBank:
        return cls(features, min(k, len(features)))

    def score(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}); got shape {features.shape}")
        similarity = _l2_normalize(features) @ self.bank.T
        return 1.0 - np.partition(similarity, -self.k, axis=1)[:, -self.k].astype(np.float64)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "wb") as f:  # plain arrays, never a pickle; a file object keeps the caller's file name
            np.savez(f, bank=self.bank.astype(np.float16), k=np.array(self.k))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureBank:
        arrays = _load_arrays(path, BANK_KEYS, "feature-bank")
        return cls(arrays["bank"], int(arrays["k"]))


STAGE_NAMES = ("stem", "layer1", "layer2")  # the early stages whose channel statistics StageGaussians models
# What each "not a car" signal reads, in the words an answer gives for a refusal
SIGNAL_WORDS = {
    "stem": "its colours and textures are unlike every car photo the model was trained on",
    "layer1": "its colours and textures are unlike every car photo the model was trained on",
    "layer2": "its textures and patterns are unlike every car photo the model was trained on",
    "layer3": "its shapes and parts are far from every car the model was trained on",
    "energy": "none of the model's car classes responds to it",
}
# The same, in a few words (a gallery caption)
SIGNAL_SHORT = {"stem": "colours, textures", "layer1": "colours, textures", "layer2": "textures, patterns",
                "layer3": "shapes, parts", "energy": "no class responds"}
STATS_KEYS = ("widths", "centre", "spread")
# The signals that judge a car the detector found: its crop is a part of a photo of another kind (another street,
# other light), whose colour and texture statistics need not match the training photos', but whose shapes and class
# responses do. Measured on held-out scenes (seeds 51/61, docs/BENCHMARKS.md "Naming round"), each way with its own
# car limit: every signal names 56%/63% of the found cars (the early stages refuse 22 and 12), these two 72%/70%;
# the early stages also refused 3 more of the 27 boxes on no car.
CAR_SIGNALS = ("layer3", "energy")


class FarScore:
    """How far a photo lies from every car the model was trained on: the largest of several signals, each put on
    the scale of the validation cars (0 at their median, 1 at their 99th percentile), so no one signal needs to be
    right about every kind of photo. Signals: the channel statistics of the early stages (StageGaussians: colours
    and textures), the layer3 k-NN distance (FeatureBank: shapes and parts), and the energy of the logits
    (-logsumexp, Liu et al. 2020: no class responds). Measured on the demo preset (bench/trust.py): AUROC of test
    cars against real photographs 0.996-0.997 combined, 0.96-0.98 for the k-NN alone, 0.90-0.92 for max-softmax.

    `features` are what evaluation.evaluate.forward returns: the pooled layer3 features (bank.dim), then the
    early stages' channel statistics (stages.dim). A run calibrated before the statistics existed has only the
    bank: its score is the raw k-NN distance (centre 0, spread 1), as it was.
    """

    def __init__(self, bank: FeatureBank, stages: StageGaussians | None = None,
                 centre: np.ndarray | None = None, spread: np.ndarray | None = None):
        self.bank, self.stages = bank, stages
        self.names = ([*STAGE_NAMES[:len(stages.widths)], "layer3", "energy"] if stages is not None
                      else ["layer3"])
        self.centre = np.zeros(len(self.names)) if centre is None else np.asarray(centre, dtype=np.float64)
        self.spread = np.ones(len(self.names)) if spread is None else np.asarray(spread, dtype=np.float64)
        if self.centre.shape != (len(self.names),) or self.spread.shape != (len(self.names),):
            raise ValueError(f"centre and spread need one value per signal ({', '.join(self.names)})")

    def signals(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """(N, signals) raw scores, each larger = less like the training cars."""
        features = np.asarray(features, dtype=np.float32)
        knn = self.bank.score(features[:, :self.bank.dim])[:, None]
        if self.stages is None:
            return knn
        stats = features[:, self.bank.dim:]
        energy = -logsumexp(np.asarray(logits, dtype=np.float64), axis=1)[:, None]
        return np.hstack([self.stages.score(stats), knn, energy])

    def set_scale(self, val_features: np.ndarray, val_logits: np.ndarray, keep: float = 0.99) -> None:
        """Centre each signal on the validation cars' median and scale it by their `keep` quantile."""
        raw = self.signals(val_features, val_logits)
        self.centre = np.median(raw, axis=0)
        self.spread = np.maximum(np.quantile(raw, keep, axis=0) - self.centre, 1e-12)

    def score(self, features: np.ndarray, logits: np.ndarray,
              only: tuple[str, ...] | None = None) -> tuple[np.ndarray, list[str]]:
        """(N,) combined scores and, for each photo, the name of the signal that set it; `only`: of these signals
        alone (those this score has; CAR_SIGNALS for a detected car)."""
        scaled = (self.signals(features, logits) - self.centre) / self.spread
        names = self.names
        if only is not None and any(name in only for name in names):
            kept = [i for i, name in enumerate(names) if name in only]
            scaled, names = scaled[:, kept], [names[i] for i in kept]
        return scaled.max(axis=1), [names[i] for i in scaled.argmax(axis=1)]

    def save_stages(self, path: str | os.PathLike) -> None:
        """The stage Gaussians and the signals' scale, as plain arrays (the bank has its own file)."""
        stages = self.stages
        with open(path, "wb") as f:  # never a pickle; a file object keeps the caller's file name
            np.savez(f, widths=np.array(stages.widths), centre=self.centre, spread=self.spread,
                     **{f"mean_{i}": m for i, m in enumerate(stages.means)},
                     **{f"whiten_{i}": w for i, w in enumerate(stages.whitens)})

    @classmethod
    def load(cls, bank: FeatureBank, stages_path: str | os.PathLike | None) -> FarScore:
        if stages_path is None:
            return cls(bank)
        arrays = _load_arrays(stages_path, STATS_KEYS, "feature-statistics")
        widths = [int(w) for w in np.ravel(arrays["widths"])]
        parts = [f"{kind}_{i}" for i in range(len(widths)) for kind in ("mean", "whiten")]
        missing = [k for k in parts if k not in arrays]
        if missing or not 1 <= len(widths) <= len(STAGE_NAMES):
            raise ValueError(f"{stages_path} is not a feature-statistics file: "
                             f"{'missing ' + ', '.join(missing) if missing else f'{len(widths)} stages'}")
        stages = StageGaussians(widths, [arrays[f"mean_{i}"] for i in range(len(widths))],
                                [arrays[f"whiten_{i}"] for i in range(len(widths))])
        return cls(bank, stages, arrays["centre"], arrays["spread"])


def ood_threshold(in_scores: np.ndarray, keep: float = 0.99) -> float:
    """The score below which `keep` of the in-distribution (validation car) scores fall."""
    in_scores = np.asarray(in_scores, dtype=np.float64).ravel()
    if len(in_scores) == 0:
        raise ValueError("no in-distribution scores to set an OOD threshold from")
    return float(np.quantile(in_scores, keep))


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve for telling out-of-distribution (positive, higher score) from in-distribution."""
    in_scores, out_scores = np.ravel(in_scores), np.ravel(out_scores)
    truth = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(truth, np.r_[in_scores, out_scores]))


# -------------------------------------------------------------------------------------------------- answers


def answer_status(model_prob: float, make_prob: float, thresholds: dict,
                  ood_score: float | None = None) -> str:
    """One of STATUSES: "no-car" beats everything, then the most specific answer the thresholds allow."""
    ood_limit = thresholds.get("ood")
    if ood_score is not None and ood_limit is not None and ood_score > ood_limit:
        return "no-car"
    if model_prob >= thresholds["model"]:
        return "model"
    if make_prob >= thresholds["make"]:
        return "make"
    return "unsure"
