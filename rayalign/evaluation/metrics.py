"""Classification metrics for validating a judge (pure Python)."""

from __future__ import annotations

from typing import Sequence


def binary_metrics(labels: Sequence[int], predictions: Sequence[int]) -> dict[str, float | int]:
    """Accuracy, precision, recall and F1 with 1 (good) as the positive class, and the confusion counts.

    Precision / recall / F1 are 0.0 when undefined (no predicted or no actual positives).
    """
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    tp = sum(1 for y, p in zip(labels, predictions) if y == 1 and p == 1)
    tn = sum(1 for y, p in zip(labels, predictions) if y == 0 and p == 0)
    fp = sum(1 for y, p in zip(labels, predictions) if y == 0 and p == 1)
    fn = sum(1 for y, p in zip(labels, predictions) if y == 1 and p == 0)
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": n, "accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Probability that a random good (1) row scores above a random bad (0) one (ties count half): how well a
    reward *ranks* answers, which is what RL uses. None when either class is missing."""
    pos = sorted(s for y, s in zip(labels, scores) if y == 1)
    neg = sorted(s for y, s in zip(labels, scores) if y == 0)
    if not pos or not neg:
        return None
    import bisect

    wins = sum(bisect.bisect_left(neg, p) + 0.5 * (bisect.bisect_right(neg, p) - bisect.bisect_left(neg, p))
               for p in pos)
    return wins / (len(pos) * len(neg))
