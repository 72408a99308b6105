"""Score -> reward transforms (pure functions)."""

from __future__ import annotations

import math
from typing import Literal


def score_to_reward(score: float, transform: Literal["logit", "identity"] = "logit",
                    clamp: tuple[float, float] = (0.01, 0.99)) -> float:
    """``logit(clamp(score))`` by default: mediocre scores are pushed down and the extremes weigh more
    (0.5 -> 0, 0.99 -> 4.6, 0.01 -> -4.6). ``identity`` returns the clamped score."""
    lo, hi = clamp
    s = min(max(score, lo), hi)
    if transform == "identity":
        return s
    return math.log(s / (1.0 - s))
