"""From a network's outputs to an answer a user can trust: calibrated top classes, the makes, and a status.

A run (or an exported model) that was calibrated holds `calibration.json` (temperature, thresholds),
`feature_bank.npz` and `feature_stats.npz` (the "not a car" score); `Calibration.load` reads them and falls back to
temperature 1 and plain thresholds for older runs, saying so. The same object serves the Predictor, evaluation and
the CLI. Every Answer says why in words (`reason`): which threshold it passed or missed, or which signal found the
photo far from every training car.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..rundir import read_json
from .trust import CAR_SIGNALS, SIGNAL_SHORT, SIGNAL_WORDS, FarScore, FeatureBank, answer_status, make_probs, softmax

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
BANK_FILE = "feature_bank.npz"
STATS_FILE = "feature_stats.npz"
# Without calibration.json: answer "model" or "make" only when more likely than not.
DEFAULT_THRESHOLDS = {"model": 0.5, "make": 0.5, "ood": None}
UNCALIBRATED_NOTE = ("this model has no calibration.json: probabilities are uncalibrated and no photo is told apart "
                     "as 'no car'; `python -m carapp calibrate --run RUN` fixes both")


@dataclass
class Answer:
    status: str                         # model | make | unsure | no-car
    top: list[tuple[str, float]]        # calibrated (class, probability), best first
    make: tuple[str, float]             # the most likely make, probability summed over its models
    makes: list[tuple[str, float]]      # the top makes
    ood_score: float | None = None      # larger: less like the training cars
    ood_signal: str | None = None       # the signal that set ood_score (trust.SIGNAL_WORDS)
    reason: str = ""                    # why this status, in words


@dataclass
class Calibration:
    labels: list[str]
    class_makes: list[str]
    temperature: float = 1.0
    thresholds: dict = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    far: FarScore | None = None
    calibrated: bool = False            # False: an older run, with temperature 1 and the default thresholds
    note: str = ""                      # threshold_note: why every answer is 'not sure', if it is
    car_crop: dict | None = None        # how a detected car is cropped for this model (carapp.car_crops)

    @classmethod
    def load(cls, folder: Path | None, labels: list[str], class_makes: list[str] | None = None) -> "Calibration":
        """The calibration stored in `folder` (a run or an export), or the uncalibrated default."""
        makes = class_makes or first_words(labels)
        info = read_json(folder / CALIBRATION_FILE) if folder else None
        if info is None:
            return cls(labels, makes)
        thresholds = {**DEFAULT_THRESHOLDS, **info.get("thresholds", {})}
        far = _load_far_score(folder, info)
        if far is None:  # no score to compare with either limit
            thresholds["ood"] = thresholds["ood_car"] = None
        return cls(labels, makes, float(info.get("temperature", 1.0)), thresholds, far, True, threshold_note(info),
                   info.get("car_crop"))

    def probs(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits, self.temperature)

    def ood_scores(self, features: np.ndarray | None, logits: np.ndarray,
                   cars: bool = False) -> tuple[np.ndarray | None, list]:
        """The "not a car" scores and the signal that set each; `cars`: of detected cars (trust.CAR_SIGNALS)."""
        if self.far is None or features is None:
            return None, [None] * len(logits)
        return self.far.score(features, logits, CAR_SIGNALS if cars else None)

    def answers(self, logits: np.ndarray, features: np.ndarray | None = None, top_k: int = 5,
                thresholds: dict | None = None, cars: bool = False) -> list[Answer]:
        """One Answer per row of logits; `thresholds` overrides the stored ones (the app's sliders); `cars`: the
        rows are crops of cars a detector found."""
        probs = self.probs(logits)
        make_names, by_make = make_probs(probs, self.class_makes)
        scores, signals = self.ood_scores(features, logits, cars)
        limits = {**self.thresholds, **(thresholds or {})}
        moved = cars and limits.get("ood_car") is not None and "ood" not in (thresholds or {})
        if moved:  # a found car stands in a street of another kind: judged as cars on other backgrounds are
            limits["ood"] = limits["ood_car"]
        out = []
        for i, row in enumerate(probs):
            best = np.argsort(-row)[:top_k]
            makes = np.argsort(-by_make[i])[:top_k]
            score = None if scores is None else float(scores[i])
            status = answer_status(float(row[best[0]]), float(by_make[i, makes[0]]), limits, score)
            answer = Answer(status, [(self.labels[j], float(row[j])) for j in best],
                            (make_names[makes[0]], float(by_make[i, makes[0]])),
                            [(make_names[j], float(by_make[i, j])) for j in makes], score, signals[i])
            answer.reason = reason(answer, limits, moved)
            out.append(answer)
        return out


def _load_far_score(folder: Path, info: dict) -> FarScore | None:
    """The "not a car" score beside a calibration, or None (the status then never says no-car) when its files are
    missing or damaged: a damaged file costs that status, not the prediction."""
    bank_file, stats_file = folder / BANK_FILE, folder / STATS_FILE
    multi = len(info.get("ood_signals", ["layer3"])) > 1  # calibrated with the stage statistics
    if not bank_file.is_file() or (multi and not stats_file.is_file()):
        return None
    try:
        return FarScore.load(FeatureBank.load(bank_file), stats_file if multi else None)
    except ValueError as exc:
        log.warning("ignoring the 'not a car' score of %s: %s", folder, exc)
        return None


def reason(answer: Answer, limits: dict, moved: bool = False) -> str:
    """Why an answer has its status, in words and numbers: the threshold passed or missed, or what refused it
    (`moved`: the "not a car" limit is the one of validation cars shown on other backgrounds)."""
    (name, prob), (make, make_prob) = answer.top[0], answer.make
    if answer.status == "no-car":
        words = SIGNAL_WORDS.get(answer.ood_signal or "layer3", SIGNAL_WORDS["layer3"])
        return (f"Not a car: {words} (far-from-training score {answer.ood_score:.2f}; 99% of the validation cars"
                f"{' shown on other backgrounds' if moved else ''} score below {limits['ood']:.2f}).")
    checked = "" if answer.ood_score is None or limits.get("ood") is None else \
        f" Far-from-training score {answer.ood_score:.2f}, under the {limits['ood']:.2f} where 'not a car' begins" \
        f"{' for a car found in a photo' if moved else ''}."
    if answer.status == "model":
        return f"{name}: {prob:.0%}, at or above the {limits['model']:.0%} a model answer needs.{checked}"
    missed = f"the best model, {name}, has {prob:.0%}, under the {limits['model']:.0%} a model answer needs"
    if answer.status == "make":
        return (f"Make only: {missed}; its make {make} has {make_prob:.0%} (a make answer needs "
                f"{limits['make']:.0%}).{checked}")
    return f"Not sure: {missed}, and the best make, {make}, has {make_prob:.0%}, under {limits['make']:.0%}.{checked}"


def refusal_tag(reason: str) -> str:
    """A few words for why a photo was answered "no car", read back from its reason (a gallery caption; the whole
    reason, numbers included, is in predictions.csv)."""
    return next((SIGNAL_SHORT[name] for name, words in SIGNAL_WORDS.items() if words in reason),
                "no car found" if "detector" in reason else "far from the cars")


def threshold_note(calibration: dict) -> str:
    """In words, when no threshold lets answers reach the target accuracy on validation (calibrate then sets 1.0:
    every answer is 'not sure'): what the model does reach, and what would help. Empty otherwise."""
    thresholds, target = calibration.get("thresholds", {}), calibration.get("target_accuracy", 0.95)
    missed = [k for k in ("model", "make") if thresholds.get(k, 0) >= 1.0]
    if not missed:
        return ""
    reached = calibration.get("val_top1")
    return (f"No confidence threshold makes {' or '.join(k + ' answers' for k in missed)} {target:.0%} right on the "
            f"validation photos" + (f" (the model is right on {reached:.1%} of them)" if reached is not None else "")
            + ": every such answer is 'not sure'. More epochs or more data per class would help.")


def first_words(labels: list[str]) -> list[str]:
    """The make of each class when nothing says it: class names are "<make> <model>"."""
    return [name.split(" ")[0] for name in labels]


def class_makes_of(folder: Path | None, labels: list[str]) -> list[str] | None:
    """The make of each class from a labels.json beside the model (run directories and exports have one)."""
    info = read_json(folder / "labels.json") if folder else None
    if not info or len(info) != len(labels) or any("make" not in c for c in info):
        return None
    return [c["make"] for c in info]
