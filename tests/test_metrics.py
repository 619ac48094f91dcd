"""idcmap.metrics against hand computations and brute force."""
from __future__ import annotations

import math

import numpy as np
import pytest

from idcmap import metrics


def test_confusion_and_classification_report_by_hand():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    predicted = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 0])
    # TP 3, FN 1, FP 2, TN 4
    assert metrics.confusion(labels, predicted).tolist() == [[4, 2], [1, 3]]
    report = metrics.classification_report(labels, predicted)
    assert report["confusion_matrix"] == [[4, 2], [1, 3]]
    assert report["accuracy"] == pytest.approx(7 / 10)
    assert report["recall_idc"] == pytest.approx(3 / 4)
    assert report["precision_idc"] == pytest.approx(3 / 5)
    assert report["f1_idc"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert report["recall_non_idc"] == pytest.approx(4 / 6)
    assert report["precision_non_idc"] == pytest.approx(4 / 5)
    assert report["f1_non_idc"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    assert report["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)


def test_classification_report_degenerate_cases_are_zero_not_nan():
    report = metrics.classification_report(np.zeros(4, int), np.zeros(4, int))
    assert report["accuracy"] == 1.0
    assert report["precision_idc"] == 0.0 and report["recall_idc"] == 0.0 and report["f1_idc"] == 0.0
    assert report["recall_non_idc"] == 1.0
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in report.values())


def test_balanced_accuracy_averages_the_classes_present():
    """A group with one class (no IDC at all): its recall alone, as scikit-learn gives it; a class
    with no patch is not a recall of 0."""
    assert metrics.classification_report(np.zeros(4, int), np.zeros(4, int))["balanced_accuracy"] == 1.0
    assert metrics.classification_report(np.zeros(4, int), np.array([0, 0, 0, 1]))["balanced_accuracy"] == 0.75
    assert metrics.classification_report(np.ones(2, int), np.array([1, 0]))["balanced_accuracy"] == 0.5
    assert math.isnan(metrics.classification_report(np.zeros(0, int), np.zeros(0, int))["balanced_accuracy"])


def _brute_force_auc(labels, scores):
    labels = np.asarray(labels).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    total = 0.0
    for p in pos:
        total += np.sum(p > neg) + 0.5 * np.sum(p == neg)
    return total / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_roc_auc_matches_pairwise_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    labels = rng.integers(0, 2, n)
    labels[0], labels[1] = 0, 1
    # few distinct values so ties are frequent (between and within classes)
    scores = rng.integers(0, 5, n) / 4 if seed % 2 else rng.random(n)
    assert metrics.roc_auc(labels, scores) == pytest.approx(_brute_force_auc(labels, scores), abs=1e-12)


def test_roc_auc_hand_values():
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert metrics.roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert metrics.roc_auc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts one half
    assert metrics.roc_auc([0, 1, 0, 1], [0.1, 0.3, 0.35, 0.8]) == 0.75
    assert math.isnan(metrics.roc_auc([1, 1], [0.1, 0.2]))
    assert math.isnan(metrics.roc_auc([0, 0], [0.1, 0.2]))


def test_roc_curve_endpoints():
    fpr, tpr = metrics.roc_curve(np.array([0, 1, 0, 1, 1]), np.array([0.1, 0.9, 0.5, 0.5, 0.3]))
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
    # distinct scores 0.9, 0.5, 0.3, 0.1 -> 4 points after (0, 0)
    assert len(fpr) == 5


def test_average_precision_hand_values():
    # ranks: 1 (pos) 0.9, 2 (neg) 0.8, 3 (pos) 0.7, 4 (neg) 0.1 -> AP = 1/2 * 1 + 1/2 * 2/3
    assert metrics.average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(0.5 + 1 / 3)
    # a tie at 0.5 between a positive and a negative counts as one threshold: precision 2/3 there
    assert metrics.average_precision([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert metrics.average_precision([0, 1, 1], [0.1, 0.8, 0.9]) == pytest.approx(1.0)
    assert metrics.average_precision([1, 0, 0, 0], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.25)
    assert math.isnan(metrics.average_precision([0, 0], [0.1, 0.2]))


def test_pr_curve_by_hand():
    recall, precision = metrics.pr_curve(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1]))
    np.testing.assert_allclose(recall, [0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(precision, [1.0, 0.5, 2 / 3, 0.5])


def test_expected_calibration_error_by_hand():
    labels = np.array([0, 1, 1, 1])
    probability = np.array([0.1, 0.1, 0.9, 0.9])
    # bin of 0.1: share of IDC 0.5, mean probability 0.1 -> 0.4 x 2; bin of 0.9: 1.0 vs 0.9 -> 0.1 x 2
    assert metrics.expected_calibration_error(labels, probability, bins=10) == pytest.approx((0.8 + 0.2) / 4)
    # perfectly calibrated bins give zero; probability 1.0 falls in the last bin
    assert metrics.expected_calibration_error([0, 1, 1, 1], [0.5, 0.5, 1.0, 1.0], bins=10) == pytest.approx(0.0)
    assert metrics.expected_calibration_error([1, 0], [1.0, 0.0]) == pytest.approx(0.0)
    assert metrics.expected_calibration_error([0, 0], [1.0, 1.0]) == pytest.approx(1.0)

    # the IDC probability's gap, not the top-label one: [0.3, 0.7] both IDC -> 0.7 and 0.3 off (top-label: 0.2)
    assert metrics.expected_calibration_error([1, 1], [0.3, 0.7], bins=10) == pytest.approx(0.5)


def test_equal_infinite_scores_tie_and_nan_is_refused():
    assert metrics.roc_auc([1, 0], [math.inf, math.inf]) == pytest.approx(0.5)
    assert metrics.roc_auc([0, 1], [math.inf, math.inf]) == pytest.approx(0.5)
    assert metrics.roc_auc([1, 0, 1], [-math.inf, -math.inf, 0.0]) == pytest.approx(0.75)
    assert metrics.average_precision([1, 0, 1], [-math.inf, -math.inf, 0.0]) == pytest.approx(1 / 2 + 1 / 2 * 2 / 3)
    for call in (lambda: metrics.roc_auc([0, 1, 1, 0], [math.nan, math.nan, 0.2, 0.1]),
                 lambda: metrics.average_precision([0, 1], [math.nan, 0.2]),
                 lambda: metrics.expected_calibration_error([1, 0], [math.nan, 0.2])):
        with pytest.raises(ValueError, match="NaN"):
            call()

def test_log_loss_by_hand():
    assert metrics.log_loss([1, 0], [0.0, 0.0]) == pytest.approx(math.log(2))
    assert metrics.log_loss([1], [2.0]) == pytest.approx(math.log1p(math.exp(-2.0)))
    assert metrics.log_loss([0], [2.0]) == pytest.approx(math.log1p(math.exp(2.0)))
    assert np.isfinite(metrics.log_loss([0], [1000.0]))


def test_fit_temperature_recovers_known_temperature():
    rng = np.random.default_rng(42)
    logits = rng.normal(0.0, 4.0, 20000)
    labels = (rng.random(20000) < 1 / (1 + np.exp(-logits / 2.0))).astype(int)
    temperature = metrics.fit_temperature(labels, logits)
    assert temperature == pytest.approx(2.0, abs=0.3)
    # it is a minimum of the log loss
    best = metrics.log_loss(labels, logits / temperature)
    assert best <= metrics.log_loss(labels, logits / (temperature * 1.2))
    assert best <= metrics.log_loss(labels, logits / (temperature / 1.2))


def test_fit_temperature_of_calibrated_logits_is_one():
    rng = np.random.default_rng(3)
    logits = rng.normal(0.0, 3.0, 20000)
    labels = (rng.random(20000) < 1 / (1 + np.exp(-logits))).astype(int)
    assert metrics.fit_temperature(labels, logits) == pytest.approx(1.0, abs=0.15)


def test_bootstrap_interval():
    values = np.random.default_rng(0).normal(5.0, 1.0, 40)
    low, high = metrics.bootstrap_interval(values)
    assert low < values.mean() < high
    assert high - low < 1.5  # about 4 standard errors
    assert metrics.bootstrap_interval(values) == (low, high)  # seeded
    assert metrics.bootstrap_interval(np.full(10, 0.3)) == pytest.approx((0.3, 0.3))


def test_bootstrap_interval_is_a_95_percent_interval_of_the_mean():
    """Against normal theory: the mean +- 1.96 standard errors (the plug-in one the bootstrap
    resamples), within the noise of 2,000 resamples; a 90% interval would be 16% narrower."""
    values = np.random.default_rng(1).normal(5.0, 1.0, 400)
    low, high = metrics.bootstrap_interval(values)
    standard_error = values.std() / np.sqrt(len(values))
    assert (high - low) / (2 * 1.96 * standard_error) == pytest.approx(1.0, abs=0.07)
    assert (low + high) / 2 == pytest.approx(values.mean(), abs=0.2 * standard_error)
