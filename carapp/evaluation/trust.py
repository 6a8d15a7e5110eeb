"""Answers a user can trust: the numerical core behind "how sure is the network, and should we say so?".

- Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") turns overconfident softmax
  outputs into probabilities that mean what they say; `ece` and `reliability_bins` measure how well that worked.
- Acceptance thresholds choose, from validation data, the confidence above which answers reach a target accuracy
  (selective classification), for the exact model and, with probabilities summed per make, for the make alone.
- `FeatureDensity` scores how unlike the training cars an image's penultimate-layer features are (Mahalanobis
  distance to the nearest class mean, Lee et al. 2018), so that a photo of a dog can be answered with "no car"
  instead of a confident model name.
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
from scipy.special import log_softmax
from scipy.stats import norm
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

ECE_BINS = 15
STATUSES = ("model", "make", "unsure", "no-car")

# Bounds on the temperature; beyond them the fit is chasing noise (or the logits are broken), not calibrating.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
# Keys of a saved FeatureDensity; a file missing any of them is not one.
DENSITY_KEYS = ("means", "precision", "normalize")
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


class FeatureDensity:
    """Mahalanobis distance of penultimate-layer features to the nearest class mean, with a shared (tied)
    covariance estimated with Ledoit-Wolf shrinkage: there are few images per class next to the feature dimension
    (2048 for ResNet-50, 512 for ResNet-18), so the sample covariance would be singular or wildly unstable.

    With `normalize` (the default), features are L2-normalised first, so only their direction counts, not their
    norm, which the raw distance otherwise lets dominate. Measured on a ResNet-50 trained with
    the demo preset (574 training images, 2048-D): AUROC of test cars against 300 synthetic no-car images
    (carapp.dataset.demo.make_no_car_images) was 0.958 normalised and 0.771 raw; tests/test_trust.py keeps the choice.

    Parameters are held as float32, exactly as saved, so a loaded density scores identically to the one saved.
    """

    def __init__(self, means: np.ndarray, precision: np.ndarray, normalize: bool = True):
        self.means = np.asarray(means, dtype=np.float32)
        self.precision = np.asarray(precision, dtype=np.float32)
        self.normalize = bool(normalize)
        if self.means.ndim != 2 or self.precision.shape != (self.means.shape[1],) * 2:
            raise ValueError(f"shapes disagree: means must be (K, D) and precision (D, D); got {self.means.shape} "
                             f"and {self.precision.shape}")
        # precision = L L^T, so (x - mu)^T P (x - mu) = |(x - mu) L|^2: whiten once, then distances are Euclidean
        try:
            self._whiten = np.linalg.cholesky(self.precision.astype(np.float64))
        except np.linalg.LinAlgError:
            raise ValueError("precision matrix is not positive definite") from None
        self._white_means = self.means.astype(np.float64) @ self._whiten
        self._white_mean_sq = (self._white_means ** 2).sum(axis=1)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _prepare(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}); got shape {features.shape}")
        return _l2_normalize(features) if self.normalize else features

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, normalize: bool = True) -> FeatureDensity:
        """Class means and the Ledoit-Wolf precision of the features centred on their own class mean."""
        features = np.asarray(features, dtype=np.float64)
        features = _l2_normalize(features) if normalize else features
        labels = np.asarray(labels).ravel()
        if len(features) != len(labels) or len(features) < 2:
            raise ValueError(f"need at least 2 features with one label each; got {len(features)} and {len(labels)}")
        classes, index = np.unique(labels, return_inverse=True)
        counts = np.bincount(index)
        means = np.zeros((len(classes), features.shape[1]))
        np.add.at(means, index, features)
        means /= counts[:, None]
        centred = features - means[index]
        precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        return cls(means, precision, normalize)

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N,) squared Mahalanobis distance to the nearest class mean; larger = less like the training cars."""
        white = self._prepare(features) @ self._whiten
        # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b: one (N, K) product instead of an (N, K, D) array or a loop over classes
        squared = (white ** 2).sum(axis=1)[:, None] + self._white_mean_sq[None, :] - 2.0 * white @ self._white_means.T
        return np.maximum(squared.min(axis=1), 0.0)  # rounding can push a near-zero distance below zero

    def save(self, path: str | os.PathLike) -> None:
        """An .npz of plain arrays (never a pickle), so loading one runs nothing."""
        with open(path, "wb") as f:  # a file object keeps np.savez from appending .npz to the caller's path
            np.savez(f, means=self.means, precision=self.precision, normalize=np.array(self.normalize))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureDensity:
        arrays = _load_arrays(path, DENSITY_KEYS, "feature-density")
        if arrays["normalize"].shape != ():
            raise ValueError(f"{path}: 'normalize' must be a single flag, not shape {arrays['normalize'].shape}")
        return cls(arrays["means"], arrays["precision"], bool(arrays["normalize"]))


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
    0.95 for Mahalanobis on layer4 (FeatureDensity), 0.81 for max-softmax.
    """

    def __init__(self, bank: np.ndarray, k: int = 5):
        self.bank = _l2_normalize(np.asarray(bank, dtype=np.float32)).astype(np.float32)
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
