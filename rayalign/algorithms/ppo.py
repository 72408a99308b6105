"""PPO's clipped losses (Schulman et al. 2017), token-level with masks."""

from __future__ import annotations

import torch

from rayalign.algorithms.core import masked_mean


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float = 0.2, clip_eps_high: float | None = None, loss_agg: str = "token_mean",
                norm_tokens: int = 0, token_weights: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: per token max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high)), aggregated by
    ``loss_agg`` (`aggregate`).

    All inputs (B, T); ``advantages`` may be (B, 1) for sequence-level advantages (GRPO / RLOO).
    ``clip_eps_high``: DAPO's asymmetric "clip-higher" upper bound (None: ``clip_eps``). ``token_weights``
    (B, T), no gradient: per-token importance weights on the surrogate (truncated IS, `truncated_is_weights`).
    Returns the loss and stats: clip_frac (tokens where the clipped term won), clip_frac_low / clip_frac_high
    (of those, ratio below 1 - eps / above 1 + eps_high), approx_kl (k3 of old vs new); stats are token means.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, torch.zeros_like(logprobs))  # no exp of padding
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    if token_weights is not None:
        per_token = per_token * token_weights
    loss = aggregate(per_token, mask, loss_agg, norm_tokens)
    with torch.no_grad():
        won = (clipped > unclipped).to(logprobs.dtype)
        stats = {"clip_frac": masked_mean(won, mask),
                 "clip_frac_low": masked_mean(won * (ratio < 1.0 - clip_eps).to(won.dtype), mask),
                 "clip_frac_high": masked_mean(won * (ratio > 1.0 + high).to(won.dtype), mask),
                 "approx_kl": masked_mean(torch.exp(-log_ratio) + log_ratio - 1.0, mask)}
    return loss, stats


LOSS_AGGREGATIONS = ("token_mean", "seq_mean", "seq_sum_norm")
"""How a micro-batch's per-token losses become one number (see `aggregate`)."""


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, norm_tokens: int = 0) -> torch.Tensor:
    """(B, T) per-token losses -> a scalar.

    "token_mean": the mean over every real token (DAPO's token-level loss: a long answer weighs in by its length).
    "seq_mean": the mean over answered rows of each row's token mean (the original GRPO).
    "seq_sum_norm": the mean over answered rows of each row's token sum divided by the constant ``norm_tokens``
    (Dr. GRPO: no per-sequence length normalisation, so no bias toward long wrong answers).
    """
    if how == "token_mean":
        return masked_mean(per_token, mask)
    mask_f = mask.to(per_token.dtype)
    lengths = mask_f.sum(dim=1)
    answered = (lengths > 0).to(per_token.dtype)
    sums = (per_token * mask_f).sum(dim=1)
    if how == "seq_mean":
        rows = sums / lengths.clamp(min=1.0)
    elif how == "seq_sum_norm":
        if norm_tokens <= 0:
            raise ValueError("seq_sum_norm needs norm_tokens >= 1 (the response length budget)")
        rows = sums / norm_tokens
    else:
        raise ValueError(f"unknown loss aggregation {how!r} (known: {', '.join(LOSS_AGGREGATIONS)})")
    return (rows * answered).sum() / answered.sum().clamp(min=1.0)


def gspo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float, clip_eps_high: float | None = None,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): one importance ratio per sequence,
    s_i = exp(mean_t (log pi - log pi_old)) over its real tokens (length-normalised), clipped per sequence:
    the mean over answered rows of max(-A_i s_i, -A_i clip(s_i, 1 - eps, 1 + eps_high)).

    logprobs, old_logprobs, mask: (B, T); advantages (B, 1) or (B, T) (its first column is used: one advantage per
    sequence). Returns the loss and stats: clip_frac (share of sequences clipped), clip_frac_low / _high.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    mask_f = mask.to(logprobs.dtype)
    lengths = mask_f.sum(dim=1)
    answered = (lengths > 0).to(logprobs.dtype)
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio.sum(dim=1) / lengths.clamp(min=1.0))
    adv = advantages[:, 0]
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    loss = (torch.maximum(unclipped, clipped) * answered).sum() / answered.sum().clamp(min=1.0)
    with torch.no_grad():
        won = (clipped > unclipped).to(logprobs.dtype) * answered
        n = answered.sum().clamp(min=1.0)
        stats = {"clip_frac": won.sum() / n, "clip_frac_low": (won * (ratio < 1.0 - clip_eps)).sum() / n,
                 "clip_frac_high": (won * (ratio > 1.0 + high)).sum() / n,
                 "approx_kl": masked_mean(torch.exp(-log_ratio) + log_ratio - 1.0, mask)}
    return loss, stats


def truncated_is_weights(old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor,
                         cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance sampling for the engine/learner mismatch (Yao et al. 2025, "Your efficient RL framework
    secretly brings you off-policy RL training"): the engine sampled from pi_engine, the learner's old policy is
    pi_old; weight each token by min(pi_old / pi_engine, cap). (B, T) -> weights (B, T) (1 on padding, no
    gradient) and the share of real tokens where the cap binds.
    """
    log_ratio = torch.where(mask.bool(), old_logprobs - engine_logprobs, torch.zeros_like(old_logprobs))
    raw = torch.exp(log_ratio.detach())
    weights = torch.clamp(raw, max=cap)
    return weights, masked_mean((raw > cap).to(raw.dtype), mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_eps: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * mean over real tokens of max((V - R)^2, (clip(V, V_old +- eps) - R)^2). (B, T)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return loss, {"value_clip_frac": clip_frac}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy of the policy, (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)
