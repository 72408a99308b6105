"""Offline preference losses: DPO (and its conservative form), IPO, KTO, SimPO, and the reward model's pairwise
loss. Tensors in, tensors out.

Inputs are per-sequence log-probabilities of the responses: ``logps`` = the sum over a response's tokens of
log pi(token | prefix), shape (B,) for B pairs (or B examples for KTO); ``ref_`` the same under the frozen
reference. Each loss returns the per-example loss (B,) and the implicit rewards it is built on, so the caller
averages (over the examples it counts) and logs them. The "implicit reward" of a response is
beta * (log pi - log ref) (Rafailov et al. 2023), the quantity DPO's classifier compares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))), all (B,).

    ``label_smoothing`` eps > 0 gives conservative DPO (Mitchell 2023): the preference label is taken to be wrong
    with probability eps, loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z).
    Returns (loss (B,), chosen_rewards (B,), rejected_rewards (B,)), the rewards beta * (pi - ref), detached.
    """
    chosen = chosen_logps - ref_chosen_logps
    rejected = rejected_logps - ref_rejected_logps
    z = beta * (chosen - rejected)
    loss = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss, beta * chosen.detach(), beta * rejected.detach()


def ipo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO (Azar et al. 2023): (h - 1 / (2 beta))^2 with h = (pi_w - ref_w) - (pi_l - ref_l), all (B,).

    A squared loss regresses the log-ratio gap to a finite target instead of pushing it to infinity, which is
    what makes DPO overfit deterministic preferences. (TRL feeds it per-token mean logprobs; pass those for
    the same loss.) Returns (loss, chosen_rewards, rejected_rewards) as `dpo_loss`.
    """
    chosen = chosen_logps - ref_chosen_logps
    rejected = rejected_logps - ref_rejected_logps
    loss = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
    return loss, beta * chosen.detach(), beta * rejected.detach()


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             reference_point: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024) on binary feedback: B examples, each one response labelled good or bad.

    r = log pi - log ref; z0 = the reference point, an estimate of KL(pi || ref) >= 0 carrying no gradient (by
    default the batch mean of r, clamped at 0: the "batch KL" of the paper's estimator).
    Desirable: w_d * (1 - sigmoid(beta * (r - z0))); undesirable: w_u * (1 - sigmoid(beta * (z0 - r))).
    logps, ref_logps (B,), desirable (B,) bool. Returns (loss (B,), rewards beta * r (B,), z0 (scalar)).
    """
    r = logps - ref_logps
    if reference_point is None:
        reference_point = r.detach().mean().clamp(min=0.0)
    z0 = reference_point.detach()
    good = desirable_weight * (1.0 - torch.sigmoid(beta * (r - z0)))
    bad = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(desirable.bool(), good, bad), beta * r.detach(), z0


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor,
               rejected_lengths: torch.Tensor, beta: float = 2.0,
               gamma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024), reference-free: -log sigmoid(beta * (pi_w / |y_w| - pi_l / |y_l|) - gamma).

    The reward is the length-normalised logprob beta * log pi / |y| (no reference model at all), and the
    chosen response must beat the rejected one by the target margin ``gamma``. All (B,); lengths in tokens
    (>= 1). Returns (loss, chosen_rewards, rejected_rewards), the rewards detached.
    """
    chosen = beta * chosen_logps / chosen_lengths.clamp(min=1)
    rejected = beta * rejected_logps / rejected_lengths.clamp(min=1)
    return -F.logsigmoid(chosen - rejected - gamma), chosen.detach(), rejected.detach()


def pairwise_reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                         margin: torch.Tensor | None = None) -> torch.Tensor:
    """A reward model's pairwise loss (InstructGPT, Ouyang et al. 2022): -log sigmoid(r_w - r_l - m), all (B,).

    ``margin`` m (B,) is Llama 2's (Touvron et al. 2023): pairs whose preference is clearer must be separated by
    more (there, from the rating gap; here, from the judge's score gap). None: m = 0.
    Returns the per-pair loss (B,).
    """
    gap = chosen_rewards - rejected_rewards
    if margin is not None:
        gap = gap - margin
    return -F.logsigmoid(gap)
