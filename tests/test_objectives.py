"""The learner's objectives and the one sync plan: pure control flow and maths, against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rayalign.algorithms.preference import dpo_loss
from rayalign.config import AlgorithmConfig, LearnerConfig, PreferenceConfig, lora_rank_slot
from rayalign.learner.batch import pair_plan
from rayalign.learner.objectives import (OBJECTIVES, Outputs, PolicyGradientSettings, PreferenceSettings,
                                         chosen_rows, clipped_policy_gradient, objective, response_tokens,
                                         token_share)
from rayalign.weights import SyncPlan


def test_token_share_by_hand():
    # 3 of the minibatch's 10 tokens, 2 micro-batches per rank, 2 ranks: DeepSpeed divides by 2 and averages 2
    assert token_share(3.0, 10.0, 2, 2) == pytest.approx(1.2)
    assert token_share(5.0, 5.0, 1, 1) == 1.0
    assert token_share(0.0, 0.0, 4, 2) == 0.0  # a minibatch of padding rows contributes nothing


def test_token_share_makes_micro_batch_means_the_minibatch_token_mean():
    """Micro-batch means of unequal sizes, scaled and averaged the way DeepSpeed does (sum over accumulation, / it,
    mean over ranks), equal the token mean over the whole minibatch -- not the mean of the means."""
    torch.manual_seed(0)
    world, accumulation = 2, 3
    lengths = [[5, 1, 7], [2, 9, 0]]  # tokens per micro-batch, per rank (one is all padding)
    losses = [[torch.randn(n) for n in rank] for rank in lengths]
    total = float(sum(sum(rank) for rank in lengths))
    per_rank = []
    for rank in losses:
        summed = sum(float(x.mean()) * token_share(len(x), total, accumulation, world) if len(x) else 0.0
                     for x in rank)
        per_rank.append(summed / accumulation)
    expected = float(torch.cat([x for rank in losses for x in rank]).mean())
    assert sum(per_rank) / world == pytest.approx(expected, abs=1e-6)
    naive = sum(float(x.mean()) for rank in losses for x in rank if len(x)) / 5
    assert naive != pytest.approx(expected, abs=1e-3)  # the plain mean of means would be wrong here


def test_objectives_are_picked_by_name():
    assert OBJECTIVES["ppo"].head == "lm+value"
    assert OBJECTIVES["grpo"].head == OBJECTIVES["rloo"].head == "lm"
    assert all(OBJECTIVES[n].rows_per_example == 1 and OBJECTIVES[n].needs_reference for n in ("ppo", "grpo", "rloo"))
    assert [OBJECTIVES[n].rows_per_example for n in ("dpo", "ipo", "simpo", "kto")] == [2, 2, 2, 1]
    assert not OBJECTIVES["simpo"].needs_reference and OBJECTIVES["dpo"].needs_reference
    assert objective("grpo") is OBJECTIVES["grpo"]
    # the policy-gradient objectives' reference serves the KL alone: none at a KL coefficient of 0
    for name in ("ppo", "grpo", "rloo", "gspo"):
        assert OBJECTIVES[name].uses_reference(AlgorithmConfig(name=name))
        assert not OBJECTIVES[name].uses_reference(AlgorithmConfig(name=name, kl_coef=0.0))
    assert OBJECTIVES["dpo"].uses_reference(AlgorithmConfig(kl_coef=0.0))
    assert not OBJECTIVES["simpo"].uses_reference(AlgorithmConfig())
    assert (OBJECTIVES["sft"].head, OBJECTIVES["sft"].needs_reference, OBJECTIVES["sft"].rows_per_example) == (
        "lm", False, 1)
    assert (OBJECTIVES["reward_model"].head, OBJECTIVES["reward_model"].needs_reference) == ("classifier", False)
    with pytest.raises(ValueError, match="unknown objective 'dpo0'.*dpo, dr_grpo, grpo, gspo, ipo, kto, ppo, reinforce_pp, reinforce_pp_baseline, reward_model, rloo, sft, simpo"):
        objective("dpo0")


def test_response_tokens_count_each_row():
    batch = {"response_mask": torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])}
    assert response_tokens(batch).tolist() == [2.0, 0.0, 3.0]


def test_clipped_policy_gradient_by_hand():
    """Ratio 1 (old = current), advantages 2 and 1, the k3 KL to a reference at half the first token's
    probability, in the loss with coefficient 0.1: loss = -(2 + 1) / 2 + 0.1 * (0.5 + ln 2 - 1) / 2."""
    logprobs = torch.log(torch.tensor([[0.5, 0.5, 0.3]], dtype=torch.float64)).requires_grad_()
    mb = {"response_mask": torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64),
          "logprobs": logprobs.detach().clone(),
          "ref_logprobs": torch.log(torch.tensor([[0.25, 0.5, 0.9]], dtype=torch.float64)),
          "advantages": torch.tensor([[2.0, 1.0, 7.0]], dtype=torch.float64)}
    settings = PolicyGradientSettings.from_algorithm(AlgorithmConfig(name="grpo", kl_coef=0.1), kl_coef=0.1)
    assert settings.kl_in_loss and settings.kl_estimator == "k3"
    loss, normaliser, stats = clipped_policy_gradient(Outputs(logprobs), mb, settings)
    k3 = (0.5 + math.log(2) - 1) / 2
    assert float(loss) == pytest.approx(-1.5 + 0.1 * k3, abs=1e-9)
    assert normaliser == 2.0 and float(stats["kl_loss"]) == pytest.approx(k3, abs=1e-9)
    assert float(stats["clip_frac"]) == 0.0 and "entropy" not in stats and "value_loss" not in stats
    loss.backward()
    assert logprobs.grad[0, 2] == 0  # padding gets no gradient
    assert logprobs.grad[0, 0] < logprobs.grad[0, 1] < 0  # larger advantage, stronger push up


def test_value_loss_joins_when_the_head_gives_values():
    mb = {"response_mask": torch.ones(1, 1), "logprobs": torch.zeros(1, 1), "advantages": torch.zeros(1, 1),
          "values": torch.zeros(1, 1), "returns": torch.ones(1, 1)}
    settings = PolicyGradientSettings.from_algorithm(AlgorithmConfig(name="ppo", vf_coef=0.1), kl_coef=0.0)
    loss, _, stats = clipped_policy_gradient(Outputs(torch.zeros(1, 1), values=torch.full((1, 1), 0.5)), mb,
                                             settings)
    # V = 0.5, V_old = 0, R = 1, eps 0.2: clipped V = 0.2 -> 0.5 * max(0.25, 0.64) = 0.32, weighted 0.1
    assert float(stats["value_loss"]) == pytest.approx(0.32) and float(loss) == pytest.approx(0.032)


def test_one_sync_plan_from_the_learner_config():
    assert SyncPlan.for_learner(LearnerConfig()) == SyncPlan("full", "store")  # LoRA merged: the CPU default
    assert SyncPlan.for_learner(LearnerConfig(lora_sync="adapter")) == SyncPlan("adapter", "store")
    assert SyncPlan.for_learner(LearnerConfig(full_sync="broadcast")) == SyncPlan("full", "broadcast")
    assert SyncPlan.for_learner(LearnerConfig(finetune="full", lora_sync="adapter")) == SyncPlan("full", "store")
    assert SyncPlan("adapter").engines_need_lora and not SyncPlan("full").engines_need_lora
    with pytest.raises(ValueError, match="only full weights are broadcast"):
        SyncPlan("adapter", "broadcast")
    with pytest.raises(ValueError, match="sync format"):
        SyncPlan("merged")


def test_lora_rank_slots():
    assert [lora_rank_slot(r) for r in (1, 2, 8, 12, 64, 65, 512)] == [1, 8, 8, 16, 64, 128, 512]
    with pytest.raises(ValueError, match="above vLLM's limit 512"):
        lora_rank_slot(513)


def _pairs_micro_batch():
    """Two real pairs and a padding pair: rows (chosen, rejected) x 3, T = 3."""
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.float64)
    logprobs = torch.tensor([[-0.5, -0.5, -9.0], [-3.0, -9.0, -9.0], [-1.0, -1.0, -1.0], [-0.5, -1.0, -9.0],
                             [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, -1.5, -2.0, -2.0, 0.0, 0.0], dtype=torch.float64)
    return {"response_mask": mask, "ref_logps": ref}, logprobs


def test_dpo_objective_averages_real_pairs_only():
    mb, logprobs = _pairs_micro_batch()
    settings = PreferenceSettings.from_config(PreferenceConfig(beta=0.1))
    loss, normaliser, stats = OBJECTIVES["dpo"].loss(Outputs(logprobs), mb, settings)
    # sequence logprobs: pair 1 (-1, -3), pair 2 (-3, -1.5); the padding pair is left out
    f64 = dict(dtype=torch.float64)
    expected, chosen, rejected = dpo_loss(torch.tensor([-1.0, -3.0], **f64), torch.tensor([-3.0, -1.5], **f64),
                                          torch.tensor([-1.5, -2.0], **f64), torch.tensor([-1.5, -2.0], **f64),
                                          beta=0.1)
    assert normaliser == 2.0 and float(loss) == pytest.approx(float(expected.mean()), abs=1e-9)
    assert float(stats["rewards/accuracy"]) == 0.5  # pair 1 prefers its chosen answer, pair 2 its rejected one
    assert float(stats["rewards/margin"]) == pytest.approx(float((chosen - rejected).mean()), abs=1e-9)
    assert float(stats["logps/chosen"]) == pytest.approx(-2.0)
    loss.backward()
    assert torch.all(logprobs.grad[4:] == 0) and torch.all(logprobs.grad[0, :2] < 0) and logprobs.grad[0, 2] == 0
    assert chosen_rows(mb).tolist() == [1, 0, 1, 0, 0, 0]


def test_kto_objective_by_rows():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    logprobs = torch.tensor([[-0.5, -0.5], [-2.0, -9.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    mb = {"response_mask": mask, "ref_logps": torch.tensor([-1.5, -1.5, 0.0], dtype=torch.float64),
          "label": torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)}
    loss, normaliser, stats = OBJECTIVES["kto"].loss(Outputs(logprobs), mb, PreferenceSettings.from_config(
        PreferenceConfig(name="kto", beta=0.1)))
    # r = (0.5, -0.5): z0 = 0; both losses 1 - sigmoid(0.05)
    assert normaliser == 2.0 and float(stats["kl"]) == 0.0
    assert float(loss) == pytest.approx(1 - 1 / (1 + math.exp(-0.05)), abs=1e-12)
    assert float(stats["rewards/accuracy"]) == 1.0


def test_pair_plan_keeps_pairs_together():
    plan = pair_plan(3, 2, 2, 1, 1, torch.Generator().manual_seed(0))
    rows = sorted(r for mb in plan for rank in mb for micro in rank for r in micro if r >= 0)
    assert rows == list(range(6))
    for mb in plan:
        for rank in mb:
            for micro in rank:
                assert len(micro) == 2 and (micro == [-1, -1] or (micro[0] % 2 == 0 and micro[1] == micro[0] + 1))


def test_pair_plan_by_length_deals_like_pairs_together_and_keeps_the_minibatches():
    lengths = [10, 90, 20, 80, 30, 70, 40, 60]
    plain = pair_plan(8, 8, 1, 2, 1, torch.Generator().manual_seed(0))
    sorted_ = pair_plan(8, 8, 1, 2, 1, torch.Generator().manual_seed(0), lengths=lengths)
    pairs = lambda mb: sorted(r // 2 for rank in mb for micro in rank for r in micro[0::2] if r >= 0)  # noqa: E731
    assert [pairs(mb) for mb in plain] == [pairs(mb) for mb in sorted_]  # the same pairs make each step
    micro_pairs = [[r // 2 for r in micro[0::2]] for micro in sorted_[0][0]]
    assert micro_pairs == [[1, 3], [5, 7], [6, 4], [2, 0]]  # longest first: 90, 80 | 70, 60 | 40, 30 | 20, 10
    two_ranks = pair_plan(3, 4, 2, 1, 1, torch.Generator().manual_seed(0), lengths=[5, 50, 9])
    assert [[len(m) for m in rank] for rank in two_ranks[0]] == [[2, 2], [2, 2]]  # padding pairs still even


def test_trim_cuts_a_micro_batch_to_its_own_padding():
    from rayalign.learner.batch import pad_to, trim

    mb = {"input_ids": torch.ones(2, 9, dtype=torch.long), "attention_mask": torch.tensor([[1] * 5 + [0] * 4,
                                                                                          [1] * 3 + [0] * 6]),
          "response_start": torch.tensor([2, 2]), "response_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]),
          "advantages": torch.ones(2, 5), "ref_logps": torch.ones(2)}
    out = trim(mb)
    assert out["input_ids"].shape == (2, 5) and out["attention_mask"].shape == (2, 5)
    assert out["response_mask"].shape == (2, 3) and out["advantages"].shape == (2, 3)
    assert out["ref_logps"].shape == (2,) and torch.equal(out["response_start"], mb["response_start"])
    assert pad_to(out["advantages"], 5).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    # a micro-batch of padding rows alone (select_rows' -1 rows) keeps room for one response position
    padding = {k: torch.zeros_like(v) for k, v in mb.items()}
    padding["attention_mask"][:, 0] = 1
    assert trim(padding)["input_ids"].shape == (2, 2) and trim(padding)["response_mask"].shape == (2, 1)


def test_sft_objective_is_the_token_mean_nll_of_the_responses():
    logprobs = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]], requires_grad=True)
    mb = {"response_mask": torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])}
    loss, tokens, stats = OBJECTIVES["sft"].loss(Outputs(logprobs), mb, None)
    assert tokens == 3.0 and float(loss) == pytest.approx(2.0) and float(stats["loss"]) == pytest.approx(2.0)
    loss.backward()
    assert logprobs.grad.flatten().tolist() == pytest.approx([-1 / 3, -1 / 3, 0.0, -1 / 3, 0.0, 0.0])


def test_reward_model_objective_pairs_rows_and_applies_the_margin():
    from rayalign.algorithms.preference import pairwise_reward_loss
    from rayalign.config import RewardTrainingConfig
    from rayalign.learner.objectives import RewardSettings

    scores = torch.tensor([2.0, 1.0, 0.0, 0.5, 0.0, 0.0])  # pairs (2, 1), (0, 0.5) and a padding pair
    mb = {"response_mask": torch.tensor([[1.0]] * 4 + [[0.0]] * 2),
          "score_gap": torch.tensor([0.8, 0.8, 0.4, 0.4, 0.0, 0.0])}
    plain = OBJECTIVES["reward_model"].loss(Outputs(scores=scores), mb, RewardSettings.from_config(
        RewardTrainingConfig()))
    expected = pairwise_reward_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5])).mean()
    assert plain[1] == 2.0 and float(plain[0]) == pytest.approx(float(expected))
    assert float(plain[2]["rewards/accuracy"]) == 0.5 and float(plain[2]["rewards/margin"]) == pytest.approx(0.25)
    margin = OBJECTIVES["reward_model"].loss(Outputs(scores=scores), mb, RewardSettings.from_config(
        RewardTrainingConfig(margin_scale=2.0)))
    expected = pairwise_reward_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5]), torch.tensor([1.6, 0.8]))
    assert float(margin[0]) == pytest.approx(float(expected.mean()))


def test_trim_keeps_packed_responses_that_do_not_start_at_column_zero():
    from rayalign.learner.batch import trim

    mb = {"input_ids": torch.ones(1, 8, dtype=torch.long), "attention_mask": torch.tensor([[1] * 6 + [0] * 2]),
          "response_start": torch.tensor([1]), "response_mask": torch.tensor([[0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]])}
    out = trim(mb)
    assert out["input_ids"].shape == (1, 6) and out["response_mask"].tolist() == [[0.0, 0.0, 1.0, 0.0, 1.0]]
