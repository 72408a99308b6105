"""The RL objectives beyond PPO/GRPO/RLOO -- REINFORCE++ (and -baseline), DAPO's options, Dr. GRPO, GSPO and
truncated importance sampling -- against values computed by hand (in the comments), with gradient signs on a
toy vocabulary, their config rules, and dynamic sampling's control flow."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from conftest import load_job
from rayalign.algorithms.advantages import discounted_returns, group_mean_baseline, overlong_penalty, tied_groups
from rayalign.algorithms.ppo import aggregate, gspo_loss, policy_loss, truncated_is_weights
from rayalign.config import AlgorithmConfig, ConfigError
from rayalign.learner import rl
from rayalign.learner.objectives import OBJECTIVES, Outputs, PolicyGradientSettings, objective


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_discounted_returns_by_hand():
    # gamma 0.5: G2 = 2, G1 = 0 + 0.5 * 2 = 1, G0 = 1 + 0.5 * 1 = 1.5; padding stays 0
    out = discounted_returns(t([[1.0, 0.0, 2.0, 7.0]]), t([[1, 1, 1, 0]]), gamma=0.5)
    assert out.tolist() == [[1.5, 1.0, 2.0, 0.0]]


def test_group_baselines_and_ties():
    assert group_mean_baseline(t([1.0, 3.0, 2.0, 2.0]), 2).tolist() == [-1.0, 1.0, 0.0, 0.0]  # no std division
    assert tied_groups(t([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), 2).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="groups of 2"):
        tied_groups(t([1.0, 1.0, 0.0]), 2)


def test_overlong_penalty_by_hand():
    # max 16, buffer 4: free up to 12 tokens, then -1/4 per token, -1 at 16 and beyond
    assert overlong_penalty(torch.tensor([10, 12, 14, 16, 20]), 16, 4).tolist() == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert overlong_penalty(torch.tensor([14]), 16, 4, factor=0.5).tolist() == [-0.25]
    assert overlong_penalty(torch.tensor([16]), 16, 0).tolist() == [0.0]  # off


def test_asymmetric_clip_by_hand():
    # token 1: A = +1, ratio 1.5 -> clipped at 1 + 0.28: -1.28 (high); token 2: A = -1, ratio 0.5 -> at 0.8: 0.8 (low)
    old = t([[0.0, 0.0]])
    new = t([[math.log(1.5), math.log(0.5)]])
    adv, mask = t([[1.0, -1.0]]), t([[1, 1]])
    loss, stats = policy_loss(new, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    assert loss.item() == pytest.approx((-1.28 + 0.8) / 2)
    assert (stats["clip_frac"].item(), stats["clip_frac_low"].item(), stats["clip_frac_high"].item()) == (1.0, 0.5, 0.5)
    symmetric, _ = policy_loss(new, old, adv, mask, clip_eps=0.2)  # 1.2 above
    assert symmetric.item() == pytest.approx((-1.2 + 0.8) / 2)


def test_loss_aggregations_by_hand():
    per_token = t([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = t([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # the third row is all padding: it counts nowhere
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert aggregate(per_token, mask, "seq_mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(per_token, mask, "seq_sum_norm", norm_tokens=4).item() == pytest.approx((6 / 4 + 4 / 4) / 2)
    with pytest.raises(ValueError, match="norm_tokens"):
        aggregate(per_token, mask, "seq_sum_norm")


def test_gspo_loss_by_hand():
    # row 1: log ratios 0.2, 0.4 -> s = e^0.3 = 1.35, A = 1 -> clipped at 1.2: -1.2; row 2: s = e^-0.1, inside: -e^-0.1
    old = t([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    new = t([[0.2, 0.4], [-0.1, 5.0], [3.0, 3.0]])
    mask = t([[1, 1], [1, 0], [0, 0]])  # row 2's second token and row 3 are padding
    loss, stats = gspo_loss(new, old, t([[1.0], [1.0], [1.0]]), mask, clip_eps=0.2)
    assert loss.item() == pytest.approx((-1.2 - math.exp(-0.1)) / 2)
    assert stats["clip_frac"].item() == pytest.approx(0.5) and stats["clip_frac_high"].item() == pytest.approx(0.5)


def test_truncated_is_weights_follow_a_perturbed_engine_logprob():
    old, mask = t([[-1.0, -1.0, -1.0]]), t([[1, 1, 0]])
    weights, capped = truncated_is_weights(old, t([[-1.0, -1.0, -9.0]]), mask, cap=2.0)
    assert weights.tolist() == [[1.0, 1.0, 1.0]] and capped.item() == 0.0  # engine == learner: no correction
    # perturb the engine: token 1 was less likely on the engine (e^1 = 2.72 -> capped at 2), token 2 more (e^-0.5)
    weights, capped = truncated_is_weights(old, t([[-2.0, -0.5, -9.0]]), mask, cap=2.0)
    assert weights[0, :2].tolist() == pytest.approx([2.0, math.exp(-0.5)]) and capped.item() == pytest.approx(0.5)
    # the weights scale each token's surrogate: with ratio 1 the token-mean loss is -mean(w * A)
    loss, _ = policy_loss(old, old, t([[1.0, 1.0, 1.0]]), mask, token_weights=weights)
    assert loss.item() == pytest.approx(-(2.0 + math.exp(-0.5)) / 2)


def _toy_gradient(loss_fn, advantage: float) -> float:
    """d loss / d (the sampled token's logit) on a 4-token vocabulary, ratio 1 at the start."""
    logits = torch.zeros(1, 3, 4, dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([[1, 2, 3]])
    logprobs = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    loss = loss_fn(logprobs, logprobs.detach(), torch.full((1, 1), advantage, dtype=torch.float64),
                   torch.ones(1, 3, dtype=torch.float64))
    loss.backward()
    return float(logits.grad[0, 0, 1])


@pytest.mark.parametrize("name, fn", [
    ("seq_sum_norm", lambda lp, old, a, m: policy_loss(lp, old, a, m, loss_agg="seq_sum_norm", norm_tokens=8)[0]),
    ("seq_mean", lambda lp, old, a, m: policy_loss(lp, old, a, m, loss_agg="seq_mean")[0]),
    ("gspo", lambda lp, old, a, m: gspo_loss(lp, old, a, m, clip_eps=3e-4)[0]),
])
def test_gradient_signs_on_a_toy_vocabulary(name, fn):
    # gradient descent raises a sampled token's logit when its advantage is positive, lowers it when negative
    assert _toy_gradient(fn, 1.0) < 0 < _toy_gradient(fn, -1.0), name


def test_reinforce_pp_advantages_by_hand():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    scores = torch.tensor([1.0, 0.0])
    ref = torch.zeros(2, 2)
    logprobs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])  # k1 KL per token
    algo = AlgorithmConfig(name="reinforce_pp")
    assert rl.needs_logprobs(algo) and not algo.kl_in_loss and not algo.grouped
    out = rl.advantages(algo, scores, mask, logprobs, ref, None, 0.1, 1)["advantages"]
    # token rewards: row 1 [-0.05, -0.05 + 1], row 2 [-0.1]; returns: [0.9, 0.95], [-0.1]; whitened over 3 tokens
    returns = torch.tensor([0.9, 0.95, -0.1])
    expected = (returns - returns.mean()) / torch.sqrt(returns.var(unbiased=False) + 1e-8)
    assert torch.allclose(out[mask.bool()], expected, atol=1e-5) and out[1, 1] == 0
    # -baseline: the group mean comes off the scores first (1, 0 -> 0.5, -0.5)
    base = rl.advantages(AlgorithmConfig(name="reinforce_pp_baseline"), scores, mask, logprobs, ref, None, 0.1, 2)
    returns = torch.tensor([0.5 - 0.05 - 0.05, 0.5 - 0.05, -0.5 - 0.1])
    expected = (returns - returns.mean()) / torch.sqrt(returns.var(unbiased=False) + 1e-8)
    assert torch.allclose(base["advantages"][mask.bool()], expected, atol=1e-5)


def test_dr_grpo_and_gspo_advantages():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0])
    dr = rl.advantages(AlgorithmConfig(name="dr_grpo"), scores, mask, None, None, None, 0.1, 2)["advantages"]
    assert dr.tolist() == [[-1.0, -1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]  # the group mean, no std
    gspo = rl.advantages(AlgorithmConfig(name="gspo"), scores * 3, mask, None, None, None, 0.1, 2)["advantages"]
    assert torch.allclose(gspo, torch.tensor([[-1.0, -1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]), atol=1e-5)


def test_objective_settings_and_units():
    batch = {"response_mask": torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])}
    for name, agg, units in (("grpo", "token_mean", [3, 1, 0]), ("dr_grpo", "seq_sum_norm", [1, 1, 0]),
                             ("gspo", "sequence", [1, 1, 0])):
        algo = AlgorithmConfig(name=name, norm_tokens=64)
        settings = objective(name).settings(algo, 0.05)
        assert settings.loss_agg == agg and objective(name).row_weights(batch, settings).tolist() == units
    with pytest.raises(ValueError, match="norm_tokens"):  # the job fills it from sampling.max_new_tokens
        PolicyGradientSettings.from_algorithm(AlgorithmConfig(name="dr_grpo"), 0.0)
    assert {"reinforce_pp", "reinforce_pp_baseline", "dr_grpo", "gspo"} <= set(OBJECTIVES)


def test_clipped_policy_gradient_reports_the_tis_cap_and_the_clip_sides():
    mb = {"response_mask": t([[1, 1]]), "logprobs": t([[-1.0, -1.0]]), "engine_logprobs": t([[-2.0, -1.0]]),
          "advantages": t([[1.0]])}
    settings = PolicyGradientSettings(clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.0, entropy_coef=0.0,
                                      kl_coef=0.0, kl_in_loss=True, kl_estimator="k3", clip_eps_high=0.28,
                                      tis_cap=2.0)
    loss, units, stats = OBJECTIVES["grpo"].loss(Outputs(t([[-1.0, -1.0]])), mb, settings)
    assert units == 2.0 and stats["tis_cap_frac"].item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(-(2.0 + 1.0) / 2) and {"clip_frac_low", "clip_frac_high"} <= set(stats)


@pytest.mark.parametrize("overrides, message", [
    ({"name": "gspo", "kl_in": "reward"}, "gspo divides rewards by the group's std"),
    ({"name": "gspo", "loss_agg": "token_mean"}, "leave loss_agg unset"),
    ({"name": "ppo", "dynamic_sampling": True}, "ppo has no prompt groups"),
    ({"name": "reinforce_pp", "dynamic_sampling": True}, "reinforce_pp has no prompt groups"),
    ({"clip_eps_high": 0.0}, "clip_eps_high: expected a float > 0"),
    ({"tis_cap": 0.5}, "tis_cap: expected a float >= 1"),
    ({"overlong_penalty": -1.0}, "overlong_penalty: expected a float >= 0"),
    ({"name": "grpo", "dynamic_sampling": True, "oversample": 0}, "oversample: expected an int >= 1"),
])
def test_nonsense_combinations_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        AlgorithmConfig(**overrides).validate()


def test_job_level_rules():
    job = load_job("ppo.py")
    base = job.PPOJobConfig()
    cases = {
        "drops prompt groups whose sampling.n responses tie; with n=1": dict(
            algorithm=AlgorithmConfig(name="grpo", dynamic_sampling=True), sampling=dataclasses.replace(base.sampling, n=1)),
        "dr_grpo compares responses to the same prompt": dict(
            algorithm=AlgorithmConfig(name="dr_grpo"), sampling=dataclasses.replace(base.sampling, n=1)),
        "dynamic_sampling_by: 'rule' is neither \"reward\" nor a reward component \\(judge, lexicon\\)": dict(
            algorithm=AlgorithmConfig(name="grpo", dynamic_sampling=True, dynamic_sampling_by="rule"),
            sampling=dataclasses.replace(base.sampling, n=4)),
        "overlong_buffer .* must be below sampling.max_new_tokens": dict(
            algorithm=AlgorithmConfig(overlong_buffer=base.sampling.max_new_tokens)),
    }
    for message, changes in cases.items():
        with pytest.raises(ConfigError, match=message):
            dataclasses.replace(base, **changes).validate()


@dataclasses.dataclass
class _Judged:
    reward: float
    ok: bool = True
    error: str | None = None


@dataclasses.dataclass
class _Rollout:
    prompt: str
    response: str


def _dynamic_sampling(*args):
    return load_job("ppo.py").dynamic_sampling(*args)


def test_dynamic_sampling_drops_ties_and_refills_up_to_a_bound():
    # two groups of 2: the first ties (no signal), the second does not; each refill round brings one group
    scores = {"a": 0.5, "b": 0.5, "c": 0.0, "d": 1.0, "r1a": 1.0, "r1b": 1.0, "r2a": 0.0, "r2b": 1.0,
              "r3a": 0.2, "r3b": 0.8}
    asked = []

    def generate(k, round_):
        asked.append((k, round_))
        return [f"r{round_}a", f"r{round_}b"]

    def judge(rollouts, known=None):
        assert known is None  # the reward's own ties: everything is judged
        return [_Judged(scores[r]) if scores[r] >= 0 else _Judged(None, ok=False, error="bad") for r in rollouts]

    times: dict[str, float] = {}
    rollouts, judgements, counts, error = _dynamic_sampling(["a", "b", "c", "d"], 2, 2, 3, generate, judge, None, 1,
                                                            times)
    # round 1 refills a tied group again, round 2 brings a useful one: two groups, the first round's dropped too
    assert rollouts == ["c", "d", "r2a", "r2b"] and asked == [(1, 1), (1, 2)] and error is None
    assert counts == {"groups": 4.0, "tied_groups": 2.0, "judged": 8.0, "judge/failures": 0.0, "rounds": 2.0,
                      "groups_short": 0.0}
    assert times["time/generate"] >= 0 and times["time/judge"] >= 0

    # a bound of one round, every refill tied, three times the missing groups asked for: the step trains on what
    # it has and says how many groups it lacks
    scores["r1a"] = scores["r1b"] = 1.0
    asked.clear()
    rollouts, _, counts, _ = _dynamic_sampling(["a", "b", "c", "d"], 2, 3, 1, generate, judge, None, 3, {})
    assert rollouts == ["c", "d"] and asked == [(6, 1)] and counts["groups_short"] == 2.0

    # a refill whose judgements fail is dropped and counted, never scored
    scores["r1a"] = -1.0
    rollouts, _, counts, error = _dynamic_sampling(["c", "d"], 2, 2, 1, generate, judge, None, 1, {})
    assert rollouts == ["c", "d"] and counts["judge/failures"] == 1.0 and counts["groups_short"] == 1.0
    assert error == "bad"


def test_dynamic_sampling_by_a_component_judges_only_the_groups_it_keeps():
    # three groups of 2: the rule ties on the first, differs on the second and third; one group is wanted
    rollouts = [_Rollout(f"p{i // 2}", text) for i, text in enumerate(["ok", "ok", "meat", "ok", "ok", "fish"])]
    rule_calls, judged = [], []

    def rule(prompts, responses):
        rule_calls.append(list(responses))
        return [_Judged(0.0 if r in ("meat", "fish") else 1.0) for r in responses]

    def judge(rs, known=None):
        judged.append(([r.response for r in rs], [j.reward for j in known["lexicon"]]))
        return [_Judged(j.reward + 0.5) for j in known["lexicon"]]

    kept, judgements, counts, error = _dynamic_sampling(rollouts, 2, 1, 3, None, judge, ("lexicon", rule), 4, {})
    # the first untied group alone goes to the judge, with the rule's scores to reuse; no refill was needed
    assert [r.response for r in kept] == ["meat", "ok"] and [j.reward for j in judgements] == [0.5, 1.5]
    assert judged == [(["meat", "ok"], [0.0, 1.0])] and len(rule_calls) == 1 and error is None
    assert counts == {"groups": 3.0, "tied_groups": 1.0, "judged": 2.0, "judge/failures": 0.0, "rounds": 0.0,
                      "groups_short": 0.0}

    # every group ties on the rule: the judge is never called, and a refill of oversample x missing is asked
    asked = []

    def generate(k, round_):
        asked.append(k)
        return [_Rollout("q", "ok"), _Rollout("q", "ok")]

    judged.clear()
    kept, _, counts, _ = _dynamic_sampling(rollouts[:2], 2, 1, 1, generate, judge, ("lexicon", rule), 4, {})
    assert kept == [] and judged == [] and asked == [4] and counts["groups_short"] == 1.0
