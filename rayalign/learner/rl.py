"""From scores and logprobs to advantages, for each algorithm: the glue between `rayalign.algorithms` and the job.

The driver calls `advantages` once per step, after the learner has returned the old policy's logprobs, the
reference's logprobs and (PPO) the values. Everything here is tensors in, tensors out.
"""

from __future__ import annotations

import torch

from rayalign.algorithms.advantages import (discounted_returns, gae, group_mean_baseline, grpo_advantages,
                                            rloo_advantages)
from rayalign.algorithms.core import masked_mean, masked_whiten
from rayalign.algorithms.kl import kl_estimate, kl_shaped_rewards
from rayalign.config import AlgorithmConfig


def needs_logprobs(algo: AlgorithmConfig) -> bool:
    """Whether `advantages` reads the old-policy and reference logprobs (PPO always: values and KL-shaped
    rewards; the others only with the KL in the reward)."""
    return algo.name == "ppo" or not algo.kl_in_loss


def token_kl(algo: AlgorithmConfig, logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
             mask: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) with the configured estimator, 0 on padding. (B, T). Zeros when
    ``ref_logprobs`` is None: the learner ran no reference because the KL coefficient is 0, so the KL term is 0."""
    if ref_logprobs is None:
        return torch.zeros_like(mask, dtype=torch.float32)
    return kl_estimate(logprobs, ref_logprobs, algo.estimator, mask)


def advantages(algo: AlgorithmConfig, scores: torch.Tensor, mask: torch.Tensor, logprobs: torch.Tensor | None,
               ref_logprobs: torch.Tensor | None, values: torch.Tensor | None, kl_coef: float,
               group_size: int) -> dict[str, torch.Tensor]:
    """scores (B,), the rest (B, T). Returns ``advantages`` (B, T) and ``returns`` (B, T; PPO only).

    PPO: KL-shaped token rewards (with the KL in the reward), GAE, whitening. GRPO / RLOO: a sequence-level
    advantage from the prompt's group (``group_size`` consecutive rows), the same for every token; with
    the KL in the reward (rloo) the sequence KL is subtracted from the score first. The logprobs may be None when
    `needs_logprobs` is false, the reference's when the KL coefficient is 0 (no reference was run).
    """
    if needs_logprobs(algo) and (logprobs is None or (ref_logprobs is None and kl_coef > 0)):
        raise ValueError(f"{algo.name} with the KL in the reward needs the old-policy and reference logprobs")
    if algo.name not in ESTIMATORS:
        raise ValueError(f"unknown algorithm {algo.name!r}")
    reward_kl_coef = 0.0 if algo.kl_in_loss else kl_coef
    return ESTIMATORS[algo.name](algo, scores, mask, logprobs, ref_logprobs, values, reward_kl_coef, group_size)


def _gae(algo: AlgorithmConfig, scores, mask, logprobs, ref_logprobs, values, reward_kl_coef: float,
         group_size: int) -> dict[str, torch.Tensor]:
    """PPO: KL-shaped token rewards, GAE over the value head's estimates, whitening."""
    kl = token_kl(algo, logprobs, ref_logprobs, mask)
    if values is None:
        raise ValueError("PPO needs the value head's values")
    token_rewards = kl_shaped_rewards(scores, kl, mask, reward_kl_coef)
    adv, returns = gae(token_rewards, values, mask, algo.gamma, algo.lam)
    if algo.whiten_advantages:
        adv = masked_whiten(adv, mask)
    return {"advantages": adv, "returns": returns}


def _group_baseline(baseline):
    """GRPO / RLOO: ``baseline(scores (B,), group_size) -> (B,)`` on the (KL-shaped) scores, for every token."""
    def estimate(algo: AlgorithmConfig, scores, mask, logprobs, ref_logprobs, values, reward_kl_coef: float,
                 group_size: int) -> dict[str, torch.Tensor]:
        shaped = scores
        if not algo.kl_in_loss:
            shaped = scores - reward_kl_coef * token_kl(algo, logprobs, ref_logprobs, mask).sum(dim=1)
        return {"advantages": baseline(shaped, group_size)[:, None] * mask}
    return estimate


def _reinforce_pp(baseline):
    """REINFORCE++: the score (minus ``baseline(scores, group_size)`` when given) on the last token, the KL
    penalty on every token (with the KL in the reward), reward-to-go, then whitened over the whole batch."""
    def estimate(algo: AlgorithmConfig, scores, mask, logprobs, ref_logprobs, values, reward_kl_coef: float,
                 group_size: int) -> dict[str, torch.Tensor]:
        centred = scores if baseline is None else baseline(scores, group_size)
        if algo.kl_in_loss:
            kl = torch.zeros_like(mask, dtype=torch.float32)
        else:
            kl = token_kl(algo, logprobs, ref_logprobs, mask)
        token_rewards = kl_shaped_rewards(centred, kl.float(), mask, reward_kl_coef)
        return {"advantages": masked_whiten(discounted_returns(token_rewards, mask, algo.gamma), mask)}
    return estimate


ESTIMATORS = {
    "ppo": _gae,
    "grpo": _group_baseline(grpo_advantages),
    "rloo": _group_baseline(rloo_advantages),
    "reinforce_pp": _reinforce_pp(None),
    "reinforce_pp_baseline": _reinforce_pp(group_mean_baseline),
    "dr_grpo": _group_baseline(group_mean_baseline),
    "gspo": _group_baseline(grpo_advantages),
}
"""Advantage estimators by algorithm name (see `advantages`)."""


def sequence_kl(kl: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over sequences of the summed per-token KL (the figure the KL controller and the charts track)."""
    return float((kl * mask).sum(dim=1).mean()) if kl.numel() else 0.0


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float(masked_mean(x, mask))
