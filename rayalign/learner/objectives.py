"""What the learner minimises, picked by name: one `Objective` per training method, one training path for all.

An objective says what the model needs (``head``: the LM alone, the LM plus a value head, or a sequence
classifier), how rows pair up (``rows_per_example``: 1, or 2 for a chosen/rejected pair kept in one
micro-batch), whether the frozen reference's logprobs must be computed, what each row counts for when losses are
averaged (``row_weights``: response tokens for token-level losses, 1 per example for sequence-level ones), and
``loss(outputs, micro_batch, settings) -> (loss, normaliser, stats)``. The loss is the mean over the micro-batch's
own units; `token_share` rescales it so that the optimizer step minimises the mean over the whole minibatch,
across micro-batches and ranks. Adding a method adds an entry to `OBJECTIVES`, not a branch in the worker.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import torch

from rayalign.algorithms.core import masked_mean
from rayalign.algorithms.kl import kl_estimate
from rayalign.algorithms.ppo import entropy_from_logits, gspo_loss, policy_loss, truncated_is_weights, value_loss
from rayalign.algorithms.preference import dpo_loss, ipo_loss, kto_loss, pairwise_reward_loss, simpo_loss
from rayalign.config import AlgorithmConfig, PreferenceConfig, RewardTrainingConfig


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What the training forward pass gives an objective, for a micro-batch of B rows and T response tokens."""

    logprobs: torch.Tensor | None = None
    """(B, T) the response tokens' logprobs under the policy (with gradients); None for a classifier."""
    logits: torch.Tensor | None = None
    """(B, T, V) the temperature-scaled logits that predicted them (float32), for the entropy."""
    values: torch.Tensor | None = None
    """(B, T) the value head's estimates (head "lm+value")."""
    scores: torch.Tensor | None = None
    """(B,) a classifier's scalar output per row (head "classifier")."""


LossFn = Callable[[Outputs, dict[str, torch.Tensor], Any], tuple[torch.Tensor, float, dict[str, torch.Tensor]]]


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    head: Literal["lm", "lm+value", "classifier"]
    rows_per_example: Literal[1, 2]
    needs_reference: bool
    row_weights: Callable[[dict[str, torch.Tensor], Any], torch.Tensor]
    """(batch, settings) -> (B,) what each row counts for in the minibatch mean (0 for padding rows)."""
    loss: LossFn
    settings: Callable[[Any, float], Any]
    """(the job's algorithm section, this step's KL coefficient) -> the ``settings`` its loss takes."""
    reference_for_kl: bool = False
    """The reference serves only the KL term (the policy-gradient objectives): with a KL coefficient of 0 the
    learner neither keeps nor runs one."""

    def uses_reference(self, algo: Any) -> bool:
        """Whether the learner keeps and runs a reference model for this objective under ``algo`` (the job's
        algorithm section)."""
        return self.needs_reference and not (self.reference_for_kl and algo.kl_coef == 0)


def token_share(normaliser: float, minibatch_normaliser: float, accumulation: int, world_size: int) -> float:
    """The factor on a micro-batch's mean loss that makes the optimizer step minimise the minibatch's mean.

    A micro-batch's loss is a mean over its ``normaliser`` units (tokens or examples); the minibatch holds
    ``minibatch_normaliser`` units over ``accumulation`` micro-batches on each of ``world_size`` ranks. DeepSpeed
    divides the summed gradients by ``accumulation`` and averages them over ranks, so each micro-batch is weighted
    by its share of the minibatch's units, times ``accumulation * world_size``. A minibatch of padding alone
    (``minibatch_normaliser`` 0) contributes nothing.
    """
    if minibatch_normaliser <= 0:
        return 0.0
    return normaliser / minibatch_normaliser * accumulation * world_size


def response_tokens(batch: dict[str, torch.Tensor], settings: Any = None) -> torch.Tensor:
    """(B,) response tokens per row: the unit of token-level losses."""
    return batch["response_mask"].sum(dim=1)


def policy_gradient_units(batch: dict[str, torch.Tensor], settings: "PolicyGradientSettings") -> torch.Tensor:
    """(B,) what a row counts for under the settings' loss aggregation: its response tokens for "token_mean",
    1 per answered row for the per-sequence aggregations (and gspo)."""
    if settings.loss_agg == "token_mean":
        return response_tokens(batch)
    return answered_rows(batch)


@dataclasses.dataclass(frozen=True)
class PolicyGradientSettings:
    clip_eps: float
    value_clip_eps: float
    vf_coef: float
    entropy_coef: float
    kl_coef: float
    """This step's KL coefficient; used only with the KL in the loss."""
    kl_in_loss: bool
    kl_estimator: str
    clip_eps_high: float | None = None
    loss_agg: str = "token_mean"
    """`rayalign.algorithms.ppo.aggregate`'s ``how``, or "sequence" (gspo)."""
    norm_tokens: int = 0
    tis_cap: float | None = None

    @classmethod
    def from_algorithm(cls, algo: AlgorithmConfig, kl_coef: float) -> "PolicyGradientSettings":
        if algo.aggregation == "seq_sum_norm" and algo.norm_tokens <= 0:
            raise ValueError("loss_agg seq_sum_norm needs algorithm.norm_tokens (the job sets it to "
                             "sampling.max_new_tokens)")
        return cls(clip_eps=algo.clip_eps, value_clip_eps=algo.value_clip_eps, vf_coef=algo.vf_coef,
                   entropy_coef=algo.entropy_coef, kl_coef=kl_coef, kl_in_loss=algo.kl_in_loss,
                   kl_estimator=algo.estimator, clip_eps_high=algo.clip_eps_high, loss_agg=algo.aggregation,
                   norm_tokens=algo.norm_tokens, tis_cap=algo.tis_cap)


def clipped_policy_gradient(outputs: Outputs, mb: dict[str, torch.Tensor],
                            settings: PolicyGradientSettings) -> tuple[torch.Tensor, float, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate on ``mb["advantages"]`` against ``mb["logprobs"]`` (the old policy) -- or GSPO's
    per-sequence one (loss_agg "sequence") -- plus the value loss when the outputs carry values (``mb["values"]``
    old values, ``mb["returns"]``), the KL to ``mb["ref_logprobs"]`` when it goes in the loss, and an entropy
    bonus; all (B, T). With ``tis_cap`` each token's surrogate is weighted by min(pi_old / pi_engine, cap)
    (``mb["engine_logprobs"]``). The normaliser is the micro-batch's units (`policy_gradient_units`)."""
    mask = mb["response_mask"]
    logprobs = outputs.logprobs
    stats: dict[str, torch.Tensor] = {}
    weights = None
    if settings.tis_cap is not None:
        weights, capped = truncated_is_weights(mb["logprobs"], mb["engine_logprobs"], mask, settings.tis_cap)
        stats.update(tis_cap_frac=capped, tis_weight=masked_mean(weights, mask))
    if settings.loss_agg == "sequence":
        if weights is not None:
            raise ValueError("gspo takes no per-token importance weights (tis_cap)")
        pg, pg_stats = gspo_loss(logprobs, mb["logprobs"], mb["advantages"], mask, settings.clip_eps,
                                 settings.clip_eps_high)
    else:
        pg, pg_stats = policy_loss(logprobs, mb["logprobs"], mb["advantages"], mask, settings.clip_eps,
                                   settings.clip_eps_high, settings.loss_agg, settings.norm_tokens, weights)
    loss = pg
    stats.update(policy_loss=pg, **pg_stats)
    if outputs.values is not None:
        vf, vf_stats = value_loss(outputs.values, mb["values"], mb["returns"], mask, settings.value_clip_eps)
        loss = loss + settings.vf_coef * vf
        stats.update(value_loss=vf, **vf_stats)
    if settings.kl_in_loss and settings.kl_coef > 0:
        kl = masked_mean(kl_estimate(logprobs, mb["ref_logprobs"], settings.kl_estimator, mask), mask)
        loss = loss + settings.kl_coef * kl
        stats["kl_loss"] = kl
    if outputs.logits is not None:
        entropy = masked_mean(entropy_from_logits(outputs.logits), mask)
        if settings.entropy_coef:
            loss = loss - settings.entropy_coef * entropy
        stats["entropy"] = entropy
    return loss, float(policy_gradient_units(mb, settings).sum()), stats


def _policy_gradient(name: str, head: Literal["lm", "lm+value"]) -> Objective:
    return Objective(name=name, head=head, rows_per_example=1, needs_reference=True,
                     row_weights=policy_gradient_units, loss=clipped_policy_gradient,
                     settings=PolicyGradientSettings.from_algorithm, reference_for_kl=True)


# -- offline preferences ------------------------------------------------------------------------------------
# Pairs sit in consecutive rows, chosen at 2i and rejected at 2i + 1 (`rayalign.learner.batch.pair_plan` keeps
# them in one micro-batch); a padding pair has no response tokens. The reference's per-sequence logprobs come with
# the rows (``mb["ref_logps"]``, (B,)), computed once before training.


@dataclasses.dataclass(frozen=True)
class PreferenceSettings:
    beta: float
    label_smoothing: float
    simpo_gamma: float
    kto_desirable_weight: float
    kto_undesirable_weight: float

    @classmethod
    def from_config(cls, algo: PreferenceConfig, kl_coef: float = 0.0) -> "PreferenceSettings":
        return cls(beta=algo.beta, label_smoothing=algo.label_smoothing, simpo_gamma=algo.simpo_gamma,
                   kto_desirable_weight=algo.kto_desirable_weight,
                   kto_undesirable_weight=algo.kto_undesirable_weight)


def answered_rows(batch: dict[str, torch.Tensor], settings: Any = None) -> torch.Tensor:
    """(B,) 1 for a row with a response (a kto example), 0 for padding."""
    return (batch["response_mask"].sum(dim=1) > 0).to(torch.float32)


def chosen_rows(batch: dict[str, torch.Tensor], settings: Any = None) -> torch.Tensor:
    """(B,) 1 on the chosen row of each real pair, 0 elsewhere: a pair counts once."""
    weights = answered_rows(batch)
    weights[1::2] = 0.0
    return weights


def _mean(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    return (x * real).sum() / real.sum().clamp(min=1.0)


def _pair_loss(outputs: Outputs, mb: dict[str, torch.Tensor], losses_of: Callable) -> tuple:
    """Split (2P,) sequence logprobs into pairs, apply ``losses_of(chosen, rejected, ref_chosen, ref_rejected,
    lengths_chosen, lengths_rejected) -> (losses, chosen_rewards, rejected_rewards)`` (all (P,)), and average
    over the real pairs."""
    mask = mb["response_mask"]
    logps = (outputs.logprobs * mask).sum(dim=1)
    lengths = mask.sum(dim=1)
    ref = mb.get("ref_logps", torch.zeros_like(logps))
    real = (lengths[0::2] > 0).to(logps.dtype)
    losses, chosen, rejected = losses_of(logps[0::2], logps[1::2], ref[0::2], ref[1::2], lengths[0::2],
                                         lengths[1::2])
    loss = _mean(losses, real)
    stats = {"loss": loss.detach(), "rewards/chosen": _mean(chosen, real), "rewards/rejected": _mean(rejected, real),
             "rewards/accuracy": _mean((chosen > rejected).to(logps.dtype), real),
             "rewards/margin": _mean(chosen - rejected, real), "logps/chosen": _mean(logps[0::2].detach(), real),
             "logps/rejected": _mean(logps[1::2].detach(), real)}
    return loss, float(real.sum()), stats


def dpo_objective(outputs: Outputs, mb: dict[str, torch.Tensor], settings: PreferenceSettings) -> tuple:
    return _pair_loss(outputs, mb, lambda c, r, rc, rr, lc, lr: dpo_loss(c, r, rc, rr, settings.beta,
                                                                         settings.label_smoothing))


def ipo_objective(outputs: Outputs, mb: dict[str, torch.Tensor], settings: PreferenceSettings) -> tuple:
    return _pair_loss(outputs, mb, lambda c, r, rc, rr, lc, lr: ipo_loss(c, r, rc, rr, settings.beta))


def simpo_objective(outputs: Outputs, mb: dict[str, torch.Tensor], settings: PreferenceSettings) -> tuple:
    return _pair_loss(outputs, mb, lambda c, r, rc, rr, lc, lr: simpo_loss(c, r, lc, lr, settings.beta,
                                                                           settings.simpo_gamma))


def kto_objective(outputs: Outputs, mb: dict[str, torch.Tensor], settings: PreferenceSettings) -> tuple:
    """KTO on single labelled rows (``mb["label"]`` (B,), 1 = desirable); the reference point is this
    micro-batch's mean log-ratio over its real rows (clamped at 0, no gradient)."""
    mask = mb["response_mask"]
    logps = (outputs.logprobs * mask).sum(dim=1)
    real = answered_rows(mb).to(logps.dtype)
    ratio = (logps - mb["ref_logps"]).detach()
    z0 = _mean(ratio, real).clamp(min=0.0)
    desirable = mb["label"] > 0.5
    losses, rewards, _ = kto_loss(logps, mb["ref_logps"], desirable, settings.beta, settings.kto_desirable_weight,
                                  settings.kto_undesirable_weight, reference_point=z0)
    good, bad = real * desirable, real * ~desirable
    loss = _mean(losses, real)
    stats = {"loss": loss.detach(), "rewards/desirable": _mean(rewards, good),
             "rewards/undesirable": _mean(rewards, bad), "kl": z0,
             "rewards/accuracy": _mean(((rewards > 0) == desirable).to(logps.dtype), real)}
    return loss, float(real.sum()), stats


def _preference(name: str, loss: LossFn, paired: bool = True, needs_reference: bool = True) -> Objective:
    return Objective(name=name, head="lm", rows_per_example=2 if paired else 1, needs_reference=needs_reference,
                     row_weights=chosen_rows if paired else answered_rows, loss=loss,
                     settings=PreferenceSettings.from_config)


# -- supervised fine-tuning and reward models --------------------------------------------------------------


def sft_objective(outputs: Outputs, mb: dict[str, torch.Tensor], settings: Any = None) -> tuple:
    """The mean negative log-likelihood of the micro-batch's response tokens (prompt tokens are context only;
    rows may be packed, `rayalign.learner.packing`). The normaliser is its response tokens."""
    mask = mb["response_mask"]
    tokens = mask.sum()
    nll = -(outputs.logprobs * mask).sum() / tokens.clamp(min=1.0)
    return nll, float(tokens), {"loss": nll.detach()}


@dataclasses.dataclass(frozen=True)
class RewardSettings:
    margin_scale: float

    @classmethod
    def from_config(cls, algo: RewardTrainingConfig, kl_coef: float = 0.0) -> "RewardSettings":
        return cls(margin_scale=algo.margin_scale)


def reward_model_objective(outputs: Outputs, mb: dict[str, torch.Tensor], settings: RewardSettings) -> tuple:
    """The pairwise loss on the classifier's scores of pairs in consecutive rows (chosen at 2i, rejected at 2i + 1),
    with the margin ``settings.margin_scale * mb["score_gap"]`` (on the chosen rows) when the scale is > 0."""
    scores = outputs.scores
    real = (mb["response_mask"].sum(dim=1)[0::2] > 0).to(scores.dtype)
    chosen, rejected = scores[0::2], scores[1::2]
    margin = settings.margin_scale * mb["score_gap"][0::2].to(scores.dtype) if settings.margin_scale > 0 else None
    loss = _mean(pairwise_reward_loss(chosen, rejected, margin), real)
    stats = {"loss": loss.detach(), "rewards/chosen": _mean(chosen.detach(), real),
             "rewards/rejected": _mean(rejected.detach(), real),
             "rewards/accuracy": _mean((chosen > rejected).to(scores.dtype), real),
             "rewards/margin": _mean((chosen - rejected).detach(), real)}
    return loss, float(real.sum()), stats


OBJECTIVES: dict[str, Objective] = {
    "ppo": _policy_gradient("ppo", "lm+value"),  # advantages from GAE over the value head's estimates
    "grpo": _policy_gradient("grpo", "lm"),  # group-normalised advantages, no critic
    "rloo": _policy_gradient("rloo", "lm"),  # leave-one-out baselines, no critic
    "reinforce_pp": _policy_gradient("reinforce_pp", "lm"),  # batch-whitened KL-shaped returns, no critic
    "reinforce_pp_baseline": _policy_gradient("reinforce_pp_baseline", "lm"),  # the same minus the group mean
    "dr_grpo": _policy_gradient("dr_grpo", "lm"),  # group mean baseline, constant length normaliser
    "gspo": _policy_gradient("gspo", "lm"),  # one clipped importance ratio per sequence
    "dpo": _preference("dpo", dpo_objective),
    "ipo": _preference("ipo", ipo_objective),
    "simpo": _preference("simpo", simpo_objective, needs_reference=False),
    "kto": _preference("kto", kto_objective, paired=False),
    "sft": Objective(name="sft", head="lm", rows_per_example=1, needs_reference=False, row_weights=response_tokens,
                     loss=sft_objective, settings=lambda algo, kl_coef: None),
    "reward_model": Objective(name="reward_model", head="classifier", rows_per_example=2, needs_reference=False,
                              row_weights=chosen_rows, loss=reward_model_objective,
                              settings=RewardSettings.from_config),
}


def objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r} (known: {', '.join(sorted(OBJECTIVES))})") from None
