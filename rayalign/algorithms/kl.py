"""KL estimators between the policy and the reference, KL-shaped rewards, and KL coefficient controllers."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: Literal["k1", "k3"] = "k1",
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KL(pi || ref) estimates from sampled tokens' logprobs, (B, T) -> (B, T); 0 where ``mask`` is 0
    (padding never reaches the ``exp``, so it cannot overflow into inf * 0 = NaN).

    k1 = log pi - log ref (unbiased, can be negative); k3 = exp(ref - pi) - (ref - pi) - 1 (unbiased, >= 0,
    lower variance; Schulman's "approximating KL divergence"). In a loss only k3's gradient pulls pi toward ref:
    k1's is zero in expectation over pi's own samples.
    """
    log_ratio = logprobs - ref_logprobs
    if mask is not None:
        log_ratio = torch.where(mask.bool(), log_ratio, torch.zeros_like(log_ratio))
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}")


def kl_shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Token rewards for PPO with KL in the reward: -kl_coef * kl_t at every token, plus the sequence reward on
    the last real token. scores: (B,), kl and mask: (B, T) -> (B, T)."""
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards[torch.arange(rewards.shape[0]), last] += scores.to(kl.dtype)
    return rewards


@dataclasses.dataclass
class FixedKLController:
    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


@dataclasses.dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019: move the coefficient so that the measured KL tracks ``target``.

    error = clip(kl / target - 1, -0.2, 0.2);  value *= 1 + error * n_steps / horizon.
    """

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
