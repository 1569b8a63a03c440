"""Task metrics of the classifiers (GLUE and images), computed from predictions and labels in plain torch.

Written here rather than taken from scikit-learn or scipy so that dyntie needs neither. Each function follows
the convention of the GLUE leaderboard's reference implementation (scikit-learn / scipy): a metric whose
denominator is zero (a constant predictor) is 0, not NaN, so a degenerate early checkpoint gets a number.
"""

from __future__ import annotations

import math

import torch


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    return float((preds == labels).float().mean()) if labels.numel() else math.nan


def _binary_counts(preds: torch.Tensor, labels: torch.Tensor) -> tuple[int, int, int, int]:
    """True positives, true negatives, false positives, false negatives; class 1 is the positive class."""
    p, y = preds.bool(), labels.bool()
    return int((p & y).sum()), int((~p & ~y).sum()), int((p & ~y).sum()), int((~p & y).sum())


def matthews_corrcoef(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Matthews correlation of binary predictions (CoLA's official metric)."""
    tp, tn, fp, fn = _binary_counts(preds, labels)
    denominator = math.sqrt(float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def f1_binary(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """F1 of the positive class 1 (MRPC's and QQP's "paraphrase"/"duplicate")."""
    tp, _, fp, fn = _binary_counts(preds, labels)
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / denominator if denominator else 0.0


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties given their average rank, as Spearman's coefficient needs."""
    values, order = torch.sort(x.double())
    ranks = torch.empty_like(values)
    start = 0
    n = len(values)
    while start < n:
        stop = start + 1
        while stop < n and values[stop] == values[start]:
            stop += 1
        ranks[order[start:stop]] = (start + stop + 1) / 2  # mean of the 1-based ranks start+1 .. stop
        start = stop
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    return pearson(_ranks(x), _ranks(y))
