"""rayalign.algorithms against values computed by hand (in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from rayalign.algorithms.advantages import gae, grpo_advantages, rloo_advantages
from rayalign.algorithms.core import masked_mean, masked_whiten
from rayalign.algorithms.kl import AdaptiveKLController, kl_estimate, kl_shaped_rewards
from rayalign.algorithms.ppo import entropy_from_logits, policy_loss, value_loss


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_masked_mean_and_whiten():
    x, m = t([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]]), t([[1, 1, 0], [1, 1, 1]])
    assert masked_mean(x, m).item() == pytest.approx(15 / 5)
    assert masked_mean(x, m, dim=1).tolist() == pytest.approx([1.5, 4.0])
    w = masked_whiten(x, m)
    assert w[0, 2].item() == 0.0
    assert masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-9)
    assert masked_mean(w**2, m).item() == pytest.approx(1.0, rel=1e-6)


def test_gae_by_hand():
    # rewards [0, 0, 1], V = 0.5 everywhere, gamma = 1:
    # lam = 1:   delta = [0, 0, 0.5] -> A = [0.5, 0.5, 0.5], returns = [1, 1, 1]
    # lam = 0.5: A2 = 0.5, A1 = 0 + 0.5 * 0.5 = 0.25, A0 = 0.125
    rewards, values, mask = t([[0, 0, 1, 5]]), t([[0.5, 0.5, 0.5, 9]]), t([[1, 1, 1, 0]])  # last column: padding
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv.flatten().tolist() == pytest.approx([0.5, 0.5, 0.5, 0.0])
    assert ret.flatten().tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0])
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert adv.flatten().tolist() == pytest.approx([0.125, 0.25, 0.5, 0.0])
    # gamma = 0.9, lam = 1, V = 0: A_t = 0.9^(2-t) * 1
    adv, _ = gae(t([[0, 0, 1]]), t([[0, 0, 0]]), t([[1, 1, 1]]), gamma=0.9, lam=1.0)
    assert adv.flatten().tolist() == pytest.approx([0.81, 0.9, 1.0])


def test_group_advantages_by_hand():
    # group 1: mean 0.5, std 0.5 -> [1, -1, -1, 1]; group 2: all equal -> 0
    out = grpo_advantages(t([1, 0, 0, 1, 2, 2, 2, 2]), group_size=4)
    assert out.tolist() == pytest.approx([1, -1, -1, 1, 0, 0, 0, 0], abs=1e-5)
    assert grpo_advantages(t([1, 3]), 2, normalize_std=False).tolist() == [-1.0, 1.0]
    # RLOO: 1 - (2 + 3) / 2 = -1.5, 2 - (1 + 3) / 2 = 0, 3 - (1 + 2) / 2 = 1.5
    assert rloo_advantages(t([1, 2, 3]), 3).tolist() == pytest.approx([-1.5, 0.0, 1.5])
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages(t([1, 2, 3, 4]), 3)


def test_kl_estimators_and_shaped_rewards():
    lp, ref = t([[math.log(0.5)]]), t([[math.log(0.25)]])
    assert kl_estimate(lp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(lp, ref, "k3").item() == pytest.approx(0.5 + math.log(2) - 1)  # e^(ref-lp) - (ref-lp) - 1
    assert kl_estimate(lp, lp, "k3").item() == 0.0
    # -0.5 * kl on every real token, plus the score (2) on the last real one
    r = kl_shaped_rewards(t([2.0]), t([[0.1, 0.2, 0.3, 0.4]]), t([[1, 1, 1, 0]]), kl_coef=0.5)
    assert r.flatten().tolist() == pytest.approx([-0.05, -0.1, 1.85, 0.0])


def test_only_k3_pulls_the_policy_toward_the_reference_from_a_loss():
    """The expected gradient (exact, over a 5-token vocabulary) of a KL penalty in the loss, estimated on the
    policy's own samples: k1's is zero (E[grad log pi] = 0), k3's points the way KL(ref || pi) descends."""
    logits = torch.tensor([1.0, 0.5, -0.3, 0.2, 0.0], requires_grad=True)
    ref = torch.log_softmax(torch.tensor([0.0, 0.8, 0.4, 0.1, -0.2]), -1)

    def expected_grad(kind):
        logp = torch.log_softmax(logits, -1)
        # sum_a pi(a) * grad k(a), with pi(a) held fixed: the score-function-free gradient of the sampled loss
        loss = (logp.exp().detach() * kl_estimate(logp[None], ref[None], kind)[0]).sum()
        return torch.autograd.grad(loss, logits)[0]

    logp = torch.log_softmax(logits, -1)
    reverse_kl = (ref.exp() * (ref - logp)).sum()  # KL(ref || pi)
    assert expected_grad("k1").abs().max() < 1e-6
    assert torch.allclose(expected_grad("k3"), torch.autograd.grad(reverse_kl, logits)[0], atol=1e-6)


def test_padding_never_reaches_the_exp():
    lp, old = t([[-1.0, -1.0]]), t([[-1.2, -200.0]])  # a garbage logprob on the padding position
    mask = t([[1, 0]])
    assert torch.isfinite(kl_estimate(old, lp, "k3", mask)).all()
    loss, stats = policy_loss(lp, old, t([[1.0, 1.0]]), mask)
    assert torch.isfinite(loss) and torch.isfinite(stats["approx_kl"])


def test_adaptive_kl_controller():
    c = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    c.update(current_kl=12.0, n_steps=256)  # error clipped to 0.2 -> 0.1 * (1 + 0.2 * 256 / 10000)
    assert c.value == pytest.approx(0.100512)
    c.update(current_kl=6.0, n_steps=256)  # on target: unchanged
    assert c.value == pytest.approx(0.100512)


def test_policy_and_value_losses_by_hand():
    # token 1: ratio 1.5, A = +1 -> max(-1.5, -1.2) = -1.2 (clipped); token 2: ratio 0.5, A = -1 -> max(0.5, 0.8) = 0.8
    lp = t([[math.log(1.5), math.log(0.5), 0.0]])
    loss, stats = policy_loss(lp, t([[0.0, 0.0, 0.0]]), t([[1.0, -1.0, 7.0]]), t([[1, 1, 0]]), clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.2)
    assert stats["clip_frac"].item() == pytest.approx(1.0)
    loss, stats = policy_loss(t([[math.log(1.1)]]), t([[0.0]]), t([[1.0]]), t([[1]]))  # inside the clip range
    assert loss.item() == pytest.approx(-1.1) and stats["clip_frac"].item() == 0.0
    # V = 0.5, V_old = 0, R = 1, eps 0.2: clipped V = 0.2 -> (0.8)^2 = 0.64 > 0.25 -> 0.5 * 0.64
    vloss, _ = value_loss(t([[0.5]]), t([[0.0]]), t([[1.0]]), t([[1]]), clip_eps=0.2)
    assert vloss.item() == pytest.approx(0.32)


def test_entropy_of_uniform_is_log_v():
    assert entropy_from_logits(torch.zeros(1, 2, 8)).flatten().tolist() == pytest.approx([math.log(8)] * 2)


def test_ppo_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    B, T, V = 4, 6, 11
    logits = torch.nn.Parameter(torch.randn(B, T, V))
    tokens = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T)
    mask[0, 4:] = 0
    advantages = torch.randn(B, T)

    def logprobs():
        return torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)

    old = logprobs().detach()
    opt = torch.optim.Adam([logits], lr=0.05)
    losses = []
    for _ in range(10):
        loss, _ = policy_loss(logprobs(), old, advantages, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
