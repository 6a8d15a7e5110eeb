"""carapp.evaluation.trust: calibration, selective answers and the not-a-car score, on data made here with a seeded RNG."""
from __future__ import annotations

import numpy as np
import pytest

from carapp.evaluation import trust
from carapp.evaluation.trust import (CAR_SIGNALS, FarScore, FeatureBank, StageGaussians, accept_threshold,
                                     answer_status, auroc, coverage_curve, ece, fit_temperature, make_probs, nll,
                                     ood_threshold, reliability_bins, selective_metrics, softmax)

# ---------------------------------------------------------------------------------------------- calibration


def test_softmax_rows_sum_to_one_and_temperature_flattens():
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]])  # the second row overflows a naive exp
    probs = softmax(logits)
    assert probs.dtype == np.float64 and np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    flat = softmax(logits, temperature=2.0)
    np.testing.assert_allclose(flat.sum(axis=1), 1.0)
    assert flat[0].max() < probs[0].max() and flat[0].min() > probs[0].min()


def test_nll_matches_hand_computation():
    logits = np.array([[0.0, np.log(3.0)]])  # probabilities 1/4, 3/4
    assert nll(logits, np.array([1])) == pytest.approx(-np.log(0.75))
    assert nll(logits, np.array([0])) == pytest.approx(-np.log(0.25))


def test_fit_temperature_recovers_a_known_overconfidence():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=2.0, size=(4000, 10))
    true_probs = softmax(logits)
    labels = np.array([rng.choice(10, p=p) for p in true_probs])  # calibrated by construction at T = 1
    overconfident = logits * 3.0
    t = fit_temperature(overconfident, labels)
    assert t == pytest.approx(3.0, rel=0.15)
    assert nll(overconfident, labels, t) <= nll(overconfident, labels)
    assert ece(softmax(overconfident, t), labels) < ece(softmax(overconfident), labels)


def test_fit_temperature_degenerate_cases_return_one():
    assert fit_temperature(np.array([[1.0, 2.0]]), np.array([1])) == 1.0   # one sample
    assert fit_temperature(np.zeros((5, 3)), np.zeros(5, dtype=int)) == 1.0  # flat logits: T changes nothing
    assert fit_temperature(np.array([[np.nan, 1.0], [0.0, 1.0]]), np.array([0, 1])) == 1.0


def test_fit_temperature_stays_within_bounds():
    # always right (wrong) with a margin: the NLL keeps falling as T shrinks (grows), and only the bounds stop it
    logits = np.array([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    sharp = fit_temperature(logits, np.array([0, 1, 0]))
    assert trust.MIN_TEMPERATURE <= sharp < 0.5
    flat = fit_temperature(logits, np.array([1, 0, 1]))
    assert 10.0 < flat <= trust.MAX_TEMPERATURE


def test_reliability_bins_and_ece_by_hand():
    # confidences 0.9 (right), 0.8 (wrong), 0.6 (right), 0.55 (right) in 2 bins (0, 0.5], (0.5, 1]: all in bin 2
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 1])
    bins = reliability_bins(probs, labels, n_bins=2)
    assert [(b["lo"], b["hi"], b["count"]) for b in bins] == [(0.0, 0.5, 0), (0.5, 1.0, 4)]
    assert bins[0]["confidence"] is None and bins[0]["accuracy"] is None
    assert bins[1]["confidence"] == pytest.approx((0.9 + 0.8 + 0.6 + 0.55) / 4)
    assert bins[1]["accuracy"] == pytest.approx(0.75)
    assert ece(probs, labels, n_bins=2) == pytest.approx(abs(0.75 - 0.7125))

    # 4 bins of 0.25: 0.9 and 0.8 share (0.75, 1], 0.6 and 0.55 share (0.5, 0.75]
    expected = 2 / 4 * abs(0.5 - 0.85) + 2 / 4 * abs(1.0 - 0.575)
    assert ece(probs, labels, n_bins=4) == pytest.approx(expected)


def test_reliability_bins_put_an_edge_in_the_bin_below():
    probs = np.array([[0.6, 0.4], [0.4, 0.6]])  # 0.6 is the upper edge of (8/15, 9/15]
    bins = reliability_bins(probs, np.array([0, 0]), n_bins=15)
    filled = [b for b in bins if b["count"]]
    assert len(filled) == 1 and filled[0]["hi"] == pytest.approx(0.6) and filled[0]["count"] == 2
    assert filled[0]["accuracy"] == 0.5


def test_make_probs_sums_models_of_a_make():
    probs = np.array([[0.1, 0.2, 0.3, 0.4], [0.7, 0.0, 0.3, 0.0]])
    makes, by_make = make_probs(probs, ["Audi", "BMW", "Audi", "Citroen"])
    assert makes == ["Audi", "BMW", "Citroen"]
    np.testing.assert_allclose(by_make, [[0.4, 0.2, 0.4], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(by_make.sum(axis=1), probs.sum(axis=1))
    with pytest.raises(ValueError):
        make_probs(probs, ["Audi", "BMW"])


# ---------------------------------------------------------------------------------------- selective answers


def test_accept_threshold_hand_example():
    confidence = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([1, 1, 1, 0, 1, 0], dtype=bool)
    # accepted from the top: accuracies 1, 1, 1, 3/4, 4/5, 4/6
    assert accept_threshold(confidence, correct, 1.0) == 0.8
    assert accept_threshold(confidence, correct, 0.8) == 0.6      # 0.7 alone would give 0.75; 0.6 brings 0.8 back
    assert accept_threshold(confidence, correct, 0.75) == 0.6
    assert accept_threshold(confidence, correct, 0.6) == 0.5
    order = np.random.default_rng(1).permutation(6)               # input order does not matter
    assert accept_threshold(confidence[order], correct[order], 0.8) == 0.6


def test_accept_threshold_accepts_ties_together():
    # two answers at 0.7, one right and one wrong: accepting "only the right one" is impossible
    confidence = np.array([0.9, 0.7, 0.7, 0.5])
    correct = np.array([1, 1, 0, 1], dtype=bool)
    assert accept_threshold(confidence, correct, 1.0) == 0.9
    assert accept_threshold(confidence, correct, 0.75) == 0.5  # 3/4 with everything; 2/3 at 0.7
    assert accept_threshold(confidence[[0, 2, 1, 3]], correct[[0, 2, 1, 3]], 1.0) == 0.9


def test_accept_threshold_all_and_none_correct():
    confidence = np.array([0.3, 0.9, 0.6])
    assert accept_threshold(confidence, np.ones(3, dtype=bool), 0.99) == 0.3   # everything: the minimum
    assert accept_threshold(confidence, np.zeros(3, dtype=bool), 0.5) == 1.0   # nothing: only certainty
    assert accept_threshold(np.array([]), np.array([], dtype=bool), 0.9) == 1.0


def test_coverage_curve_and_selective_metrics():
    confidence = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([1, 1, 1, 0, 1, 0], dtype=bool)
    curve = coverage_curve(confidence, correct, n_points=11)
    assert [p["threshold"] for p in curve] == pytest.approx(np.linspace(0, 1, 11))
    by_t = {round(p["threshold"], 1): p for p in curve}
    assert by_t[0.0] == {"threshold": 0.0, "coverage": 1.0, "accuracy": pytest.approx(4 / 6)}
    assert by_t[0.7]["coverage"] == pytest.approx(4 / 6) and by_t[0.7]["accuracy"] == pytest.approx(3 / 4)
    assert by_t[1.0]["coverage"] == 0.0 and by_t[1.0]["accuracy"] is None
    for p in curve:  # the curve and the single-threshold metrics agree everywhere
        m = selective_metrics(confidence, correct, p["threshold"])
        assert m["coverage"] == pytest.approx(p["coverage"])
        assert m["selective_accuracy"] == (None if p["accuracy"] is None else pytest.approx(p["accuracy"]))
    assert selective_metrics(confidence, correct, 0.8) == {"coverage": 0.5, "selective_accuracy": 1.0}


# ---------------------------------------------------------------------------------------- out of distribution


def stage_stats(rng: np.random.Generator, n: int, widths: list[int], shift: float = 0.0) -> np.ndarray:
    """Channel means and stds of a few stages, correlated within a stage as a network's are; `shift` moves them."""
    parts = []
    for w in widths:
        mixing = rng.normal(size=(2 * w, 2 * w)) / np.sqrt(2 * w)
        parts.append(rng.normal(size=(n, 2 * w)) @ mixing + 1.0 + shift)
    return np.hstack(parts)


def test_stage_gaussians_refuse_what_differs_in_one_stage_only():
    """A photo of another kind differs in its low-level statistics: one shifted stage must be enough."""
    rng = np.random.default_rng(0)
    widths = [4, 8, 16]
    cars = stage_stats(rng, 600, widths)
    train, inside = cars[:300], cars[300:]
    gaussians = StageGaussians.fit(train, widths)
    other = inside.copy()
    other[:, 8:24] += rng.normal(1.5, 0.2, size=(len(other), 16))  # only the second stage moves
    inner, outer = gaussians.score(inside), gaussians.score(other)
    assert inner.shape == (300, 3)
    assert auroc(inner[:, 1], outer[:, 1]) > 0.95               # the moved stage sees it
    assert auroc(inner[:, 0], outer[:, 0]) == pytest.approx(0.5, abs=0.08)  # the others do not


def test_a_stage_with_a_dead_channel_still_scores_and_saves(tmp_path):
    """A channel that never fires (zero mean and spread on every training car) must not break the fit or the file."""
    rng = np.random.default_rng(5)
    train = rng.normal(size=(40, 8)) + 2.0
    train[:, [1, 5]] = 0.0  # channel 1's mean and spread: always 0
    gaussians = StageGaussians.fit(train, [4])
    assert np.isfinite(gaussians.score(train)).all()
    far = FarScore(FeatureBank.fit(rng.normal(size=(40, 16))), gaussians)
    far.save_stages(tmp_path / "stats.npz")
    loaded = FarScore.load(far.bank, tmp_path / "stats.npz")
    np.testing.assert_array_equal(loaded.stages.score(train), gaussians.score(train))


def test_stage_gaussian_score_matches_the_definition():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(50, 6))
    gaussians = StageGaussians.fit(train, [3])
    x = rng.normal(size=(4, 6))
    mean, whiten = gaussians.means[0].astype(float), gaussians.whitens[0].astype(float)
    precision = whiten @ whiten.T
    by_hand = [(xi - mean) @ precision @ (xi - mean) for xi in x]
    np.testing.assert_allclose(gaussians.score(x)[:, 0], by_hand, rtol=1e-5)


def far_score(rng: np.random.Generator, widths=(4, 8)) -> tuple[FarScore, np.ndarray, np.ndarray]:
    """A FarScore fitted on made-up cars: features are (pooled layer3 of 16 channels, then stage statistics)."""
    def cars(n):
        return np.hstack([np.abs(rng.normal(size=(n, 16))) + np.eye(16)[rng.integers(0, 4, n)] * 3,
                          rng.normal(size=(n, 2 * sum(widths))) + 1.0])
    train, val = cars(200), cars(100)
    logits = rng.normal(size=(100, 4)) + np.eye(4)[rng.integers(0, 4, 100)] * 6
    far = FarScore(FeatureBank.fit(train[:, :16]), StageGaussians.fit(train[:, 16:], list(widths)))
    far.set_scale(val, logits)
    return far, val, logits


def test_far_score_is_on_the_scale_of_the_validation_cars_and_names_its_signal():
    rng = np.random.default_rng(2)
    far, val, logits = far_score(rng)
    assert far.names == ["stem", "layer1", "layer3", "energy"]
    scaled = (far.signals(val, logits) - far.centre) / far.spread
    np.testing.assert_allclose(np.median(scaled, axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(np.quantile(scaled, 0.99, axis=0), 1, atol=1e-9)
    odd = val[:5].copy()
    odd[:, 16 + 8:] += 6.0                      # layer1's statistics only
    score, signals = far.score(odd, logits[:5])
    assert (score > 1.5).all() and signals == ["layer1"] * 5
    quiet = logits[:5] * 0 - 5.0                # no class responds: low energy
    score, signals = far.score(val[:5], quiet)
    assert (score > 1.5).all() and set(signals) == {"energy"}


def test_a_detected_car_is_judged_by_its_shapes_and_class_responses_not_its_colours():
    """A car the detector found sits in a street of another kind: its colour statistics may be unlike every training
    photo, and that alone must not make it "not a car"; no class responding still does."""
    from carapp.evaluation.answers import Calibration
    rng = np.random.default_rng(2)
    far, val, logits = far_score(rng)
    odd = val[:5].copy()
    odd[:, 16 + 8:] += 6.0                      # layer1's statistics only
    score, signals = far.score(odd, logits[:5], only=CAR_SIGNALS)
    assert (score < 1.5).all() and set(signals) <= set(CAR_SIGNALS)
    calibration = Calibration(["A x", "A y", "B x", "B y"], ["A", "A", "B", "B"], 1.0,
                              {"model": 0.5, "make": 0.5, "ood": 1.5}, far, True)
    assert {a.status for a in calibration.answers(logits[:5], odd)} == {"no-car"}
    assert "no-car" not in {a.status for a in calibration.answers(logits[:5], odd, cars=True)}
    quiet = logits[:5] * 0 - 5.0
    assert {a.status for a in calibration.answers(quiet, val[:5], cars=True)} == {"no-car"}
    between = val[:5].copy()
    between[:, :16] = rng.normal(size=(5, 16))  # shapes unlike the training cars': layer3 far
    scores = far.score(between, logits[:5], only=CAR_SIGNALS)[0]
    limits = {"model": 0.5, "make": 0.5, "ood": float(scores.min()) - 0.1, "ood_car": float(scores.max()) + 0.1}
    calibration.thresholds = limits  # cars moved onto other backgrounds set a found car's own, higher limit
    assert {a.status for a in calibration.answers(logits[:5], between, cars=True)} != {"no-car"}
    refused = calibration.answers(logits[:5], between)
    assert {a.status for a in refused} == {"no-car"} and "shown on other backgrounds" not in refused[0].reason
    own = calibration.answers(logits[:5], between, cars=True, thresholds={"ood": limits["ood"]})  # a caller's limit
    assert {a.status for a in own} == {"no-car"}
    limits["ood_car"] = limits["ood"] - 0.05
    said = calibration.answers(logits[:5], between, cars=True)[0]
    assert said.status == "no-car" and "validation cars shown on other backgrounds score below" in said.reason
    old = FarScore(far.bank)  # a run calibrated before the stage statistics: its one signal still counts
    assert old.score(odd[:, :16], logits[:5], only=CAR_SIGNALS)[1] == ["layer3"] * 5


def test_far_score_save_load_round_trip_and_an_old_bank_alone(tmp_path):
    rng = np.random.default_rng(3)
    far, val, logits = far_score(rng)
    far.bank.save(tmp_path / "bank.npz")
    far.save_stages(tmp_path / "stats.npz")
    loaded = FarScore.load(FeatureBank.load(tmp_path / "bank.npz"), tmp_path / "stats.npz")
    np.testing.assert_allclose(loaded.score(val, logits)[0], far.score(val, logits)[0], rtol=1e-4, atol=1e-6)
    old = FarScore.load(FeatureBank.load(tmp_path / "bank.npz"), None)  # a run calibrated before the statistics
    assert old.names == ["layer3"]
    np.testing.assert_allclose(old.score(val[:, :16], logits)[0], old.bank.score(val[:, :16]))


def test_far_score_load_refuses_bad_files_and_never_unpickles(tmp_path):
    bank = FeatureBank.fit(np.random.default_rng(4).normal(size=(20, 16)))
    missing = tmp_path / "missing.npz"
    np.savez(missing, widths=np.array([4]), centre=np.zeros(3), spread=np.ones(3))
    with pytest.raises(ValueError, match="mean_0"):
        FarScore.load(bank, missing)
    shapes = tmp_path / "shapes.npz"
    np.savez(shapes, widths=np.array([4]), centre=np.zeros(3), spread=np.ones(3), mean_0=np.zeros(8),
             whiten_0=np.eye(5))
    with pytest.raises(ValueError, match="whitening"):
        FarScore.load(bank, shapes)
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(ValueError):
        FarScore.load(bank, corrupt)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, widths=np.array([{"not": "an array"}], dtype=object), centre=np.zeros(3), spread=np.ones(3))
    with pytest.raises(ValueError):
        FarScore.load(bank, pickled)


def test_ood_threshold_keeps_the_requested_share():
    scores = np.arange(1, 101, dtype=float)
    t = ood_threshold(scores, keep=0.95)
    assert np.mean(scores <= t) == pytest.approx(0.95, abs=0.01)


def test_auroc_orientation():
    assert auroc([0.1, 0.2], [0.8, 0.9]) == 1.0   # out-of-distribution scores higher: perfect
    assert auroc([0.8, 0.9], [0.1, 0.2]) == 0.0


# -------------------------------------------------------------------------------------------------- answers


@pytest.mark.parametrize("model_prob, make_prob, ood_score, expected", [
    (0.95, 0.99, 1.0, "model"),
    (0.95, 0.99, None, "model"),        # no OOD score: the check is skipped
    (0.6, 0.85, 1.0, "make"),
    (0.6, 0.7, 1.0, "unsure"),
    (0.99, 0.99, 50.0, "no-car"),       # beyond the OOD threshold beats any confidence
])
def test_answer_status_branches(model_prob, make_prob, ood_score, expected):
    thresholds = {"model": 0.9, "make": 0.8, "ood": 10.0}
    assert answer_status(model_prob, make_prob, thresholds, ood_score) == expected
    assert expected in trust.STATUSES


def test_answer_status_without_an_ood_threshold():
    thresholds = {"model": 0.9, "make": 0.8, "ood": None}
    assert answer_status(0.95, 0.99, thresholds, ood_score=1e9) == "model"
    assert answer_status(0.5, 0.5, {"model": 0.9, "make": 0.8}, ood_score=1e9) == "unsure"


def test_a_temperature_that_makes_validation_worse_is_not_kept_and_no_threshold_is_said_in_words():
    """After a short run, the NLL-fitted temperature raised val ECE 0.017 -> 0.056 and was kept; the thresholds
    came out at 1.000 and the summary said only "of those right -"."""
    from carapp.evaluation.answers import threshold_note
    from carapp.evaluation.calibrate import _improves
    from carapp.evaluation.trust import ece, fit_temperature, softmax
    rng = np.random.default_rng(0)
    worse = None
    for _ in range(200):  # small validation splits: where the NLL's best temperature raises the ECE
        logits, labels = rng.normal(0, 2, (12, 4)), rng.integers(0, 4, 12)
        t = fit_temperature(logits, labels)
        if ece(softmax(logits, t), labels) > ece(softmax(logits), labels) + 0.01:
            worse = (logits, labels, t)
            break
    assert worse is not None
    assert not _improves(*worse)
    logits, labels = rng.normal(0, 1, (400, 4)), rng.integers(0, 4, 400)
    logits[np.arange(400), labels] += 3 * rng.random(400)  # a model that is right, and overconfident, often
    assert _improves(logits * 4, labels, fit_temperature(logits * 4, labels))
    note = threshold_note({"thresholds": {"model": 1.0, "make": 0.4}, "target_accuracy": 0.95, "val_top1": 0.097})
    assert "model answers 95% right" in note and "9.7%" in note and "More epochs" in note
    assert threshold_note({"thresholds": {"model": 0.6, "make": 0.4}}) == ""
