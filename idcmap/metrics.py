"""Classification and calibration metrics in plain numpy (binary, IDC = positive class)."""
from __future__ import annotations

import numpy as np


def confusion(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """2x2 counts [[TN, FP], [FN, TP]] (rows: true class, columns: predicted)."""
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(predicted).astype(bool)
    return np.array(
        [[np.sum(~labels & ~predicted), np.sum(~labels & predicted)],
         [np.sum(labels & ~predicted), np.sum(labels & predicted)]],
        dtype=np.int64,
    )


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def classification_report(labels: np.ndarray, predicted: np.ndarray) -> dict:
    """Accuracy, balanced accuracy, precision/recall/F1 of both classes, and the confusion matrix.
    Balanced accuracy is the mean recall of the classes present (as scikit-learn's); nan without labels."""
    (tn, fp), (fn, tp) = confusion(labels, predicted)
    recall_1, recall_0 = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    precision_1, precision_0 = _ratio(tp, tp + fp), _ratio(tn, tn + fn)
    present = [recall for recall, support in ((recall_1, tp + fn), (recall_0, tn + fp)) if support]
    return {
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "balanced_accuracy": float(np.mean(present)) if present else float("nan"),
        "precision_idc": precision_1,
        "recall_idc": recall_1,
        "f1_idc": _ratio(2 * precision_1 * recall_1, precision_1 + recall_1),
        "precision_non_idc": precision_0,
        "recall_non_idc": recall_0,
        "f1_non_idc": _ratio(2 * precision_0 * recall_0, precision_0 + recall_0),
        "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]],
    }


def _ranked_counts(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorting by score, highest first: (true positives, predicted positives) at each distinct
    score as the threshold, and the labels as booleans."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    scores = np.asarray(scores)[order]
    labels = np.asarray(labels).astype(bool)
    if np.isnan(scores).any():
        raise ValueError("scores hold NaN, which has no rank")
    distinct = np.r_[np.flatnonzero(scores[1:] != scores[:-1]), len(scores) - 1]  # equal infinities tie too
    return np.cumsum(labels[order])[distinct], distinct + 1, labels


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct score, from (0,0) to (1,1)."""
    tps, predicted, labels = _ranked_counts(labels, scores)
    tpr = np.r_[0.0, tps / max(labels.sum(), 1)]
    fpr = np.r_[0.0, (predicted - tps) / max((~labels).sum(), 1)]
    return fpr, tpr


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); nan with a single class."""
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return float("nan")
    fpr, tpr = roc_curve(labels, scores)
    return float(np.trapezoid(tpr, fpr))


def pr_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every distinct score, highest score first."""
    tps, predicted, labels = _ranked_counts(labels, scores)
    return tps / max(labels.sum(), 1), tps / predicted


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """PR-AUC as average precision: sum over thresholds of (recall step) x precision."""
    if not np.asarray(labels).astype(bool).any():
        return float("nan")
    recall, precision = pr_curve(labels, scores)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def expected_calibration_error(labels: np.ndarray, probability: np.ndarray, bins: int = 15) -> float:
    """Calibration error of the IDC probability: |share of IDC labels - mean probability| in each of
    `bins` equal-width bins of the probability, averaged weighted by bin size (the reliability
    diagram's gap; not the top-label ECE of Guo et al. 2017, over max(p, 1 - p))."""
    labels = np.asarray(labels).astype(float)
    probability = np.asarray(probability, dtype=float)
    if np.isnan(probability).any():
        raise ValueError("probabilities hold NaN")
    which = np.minimum((probability * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() * abs(labels[inside].mean() - probability[inside].mean())
    return float(total / len(labels))


def log_loss(labels: np.ndarray, logits: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Mean (optionally weighted) binary cross-entropy of logits."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    return float(np.average(np.logaddexp(0.0, z) - y * z, weights=weights))


def fit_temperature(labels: np.ndarray, logits: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Temperature T minimising the (weighted) log loss of logits / T (golden-section search on log T)."""
    lo, hi = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if log_loss(labels, logits / np.exp(a), weights) < log_loss(labels, logits / np.exp(b), weights):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2))


def bootstrap_interval(values: np.ndarray, samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of per-patient values."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
