"""Advantage estimators: GAE (PPO with a critic) and group baselines (GRPO, RLOO; no critic)."""

from __future__ import annotations

import torch


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses.

    Args:
        rewards, values, mask: (B, T). ``values[:, t]`` is V(s_t); the value after the last real token is 0.
    Returns:
        advantages (B, T) and returns = advantages + values (B, T), both 0 on padding.

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t;  A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}.
    """
    mask = mask.to(values.dtype)
    B, T = rewards.shape
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros_like(next_value)
    next_mask = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        adv = delta + gamma * lam * next_mask * next_adv
        advantages[:, t] = adv * mask[:, t]
        next_value, next_adv, next_mask = values[:, t], advantages[:, t], mask[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def grpo_advantages(scores: torch.Tensor, group_size: int, normalize_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each response's reward minus its prompt group's mean, divided by the group's std (unbiased=False).

    ``scores``: (B,) with B = prompts * group_size, grouped contiguously (prompt-major). Returns (B,).
    """
    groups = _groups(scores, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if normalize_std:
        centred = centred / (groups.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each response's reward minus the mean of the *other* responses to the same prompt. (B,) -> (B,)."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    groups = _groups(scores, group_size)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not split into groups of {group_size}")
    return scores.reshape(-1, group_size)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Reward-to-go G_t = sum_{s >= t} gamma^(s-t) r_s over right-padded responses; 0 on padding. (B, T) -> (B, T).

    REINFORCE++ (Hu et al. 2025, "REINFORCE++: a simple and efficient approach for aligning LLMs") uses it on the
    KL-shaped token rewards instead of a critic's GAE.
    """
    mask = mask.to(rewards.dtype)
    out = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


def group_mean_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each response's reward minus its prompt group's mean, no std scaling. (B,) -> (B,).

    Dr. GRPO's advantage (Liu et al. 2025, "Understanding R1-Zero-like training") and the baseline of
    REINFORCE++-baseline; the same as `grpo_advantages(..., normalize_std=False)`.
    """
    return grpo_advantages(scores, group_size, normalize_std=False)


def tied_groups(scores: torch.Tensor, group_size: int, tol: float = 1e-6) -> torch.Tensor:
    """(B,) -> (B / group_size,) bool: groups whose rewards all tie (max - min <= tol). Their group-relative
    advantages are all 0, so they carry no signal (DAPO's dynamic sampling drops them; Yu et al. 2025)."""
    groups = _groups(scores, group_size)
    return (groups.max(dim=1).values - groups.min(dim=1).values) <= tol


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), (B,) response lengths -> (B,) rewards <= 0.

    0 up to ``max_tokens - buffer``; then falling linearly to ``-factor`` at ``max_tokens`` (and beyond). A
    ``buffer`` of 0 switches it off.
    """
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    over = (lengths.to(torch.float32) - (max_tokens - buffer)).clamp(min=0.0, max=float(buffer))
    return -factor * over / buffer
