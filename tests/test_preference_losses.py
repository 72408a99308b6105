"""DPO, conservative DPO, IPO, KTO, SimPO and the reward model's pairwise loss against values computed by hand,
with their gradients' signs."""

from __future__ import annotations

import math

import pytest
import torch

from rayalign.algorithms.preference import dpo_loss, ipo_loss, kto_loss, pairwise_reward_loss, simpo_loss


def _t(*x):
    return torch.tensor(x, dtype=torch.float64, requires_grad=True)


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_dpo_by_hand_and_its_gradient():
    chosen, rejected = _t(-1.0), _t(-2.0)
    ref = torch.tensor([-1.5], dtype=torch.float64)
    loss, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref, ref, beta=0.1)
    # log-ratios +0.5 and -0.5: z = 0.1 * (0.5 + 0.5) = 0.1
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-0.1)), abs=1e-12)
    assert (float(r_chosen), float(r_rejected)) == pytest.approx((0.05, -0.05))
    loss.sum().backward()
    assert chosen.grad < 0 < rejected.grad  # descent raises the chosen response and lowers the rejected one
    assert float(chosen.grad) == pytest.approx(-0.1 * (1 - _sig(0.1)))


def test_conservative_dpo_by_hand():
    ref = torch.tensor([-1.5], dtype=torch.float64)
    loss, _, _ = dpo_loss(_t(-1.0), _t(-2.0), ref, ref, beta=0.1, label_smoothing=0.2)
    expected = 0.8 * math.log(1 + math.exp(-0.1)) + 0.2 * math.log(1 + math.exp(0.1))
    assert float(loss) == pytest.approx(expected, abs=1e-12)


def test_ipo_by_hand_and_its_gradient():
    chosen, rejected = _t(-1.0), _t(-2.0)
    ref = torch.tensor([-1.5], dtype=torch.float64)
    loss, _, _ = ipo_loss(chosen, rejected, ref, ref, beta=0.1)
    assert float(loss) == pytest.approx((1.0 - 5.0) ** 2)  # h = 1, target 1 / (2 * 0.1) = 5
    loss.sum().backward()
    assert float(chosen.grad) == pytest.approx(-8.0) and float(rejected.grad) == pytest.approx(8.0)
    # past the target the square pulls the gap back: IPO does not push log-ratios to infinity
    past = _t(6.0)
    far, _, _ = ipo_loss(past, _t(0.0), torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    far.sum().backward()
    assert float(far) == pytest.approx(1.0) and float(past.grad) == pytest.approx(2.0)


def test_kto_by_hand():
    logps = _t(-1.0, -2.0)
    ref = torch.tensor([-1.5, -1.5], dtype=torch.float64)
    desirable = torch.tensor([True, False])
    loss, rewards, z0 = kto_loss(logps, ref, desirable, beta=0.1, desirable_weight=1.0, undesirable_weight=2.0)
    assert float(z0) == 0.0  # the batch mean of r = (0.5, -0.5) is 0 (and is clamped at 0 from below)
    assert loss.tolist() == pytest.approx([1 - _sig(0.05), 2 * (1 - _sig(0.05))], abs=1e-12)
    assert rewards.tolist() == pytest.approx([0.05, -0.05])
    loss.sum().backward()
    assert logps.grad[0] < 0 < logps.grad[1]  # raise the good response, lower the bad one
    given, _, _ = kto_loss(_t(-1.0), torch.tensor([-1.5], dtype=torch.float64), torch.tensor([True]), beta=0.1,
                           reference_point=torch.tensor(0.2, dtype=torch.float64))
    assert float(given) == pytest.approx(1 - _sig(0.1 * (0.5 - 0.2)), abs=1e-12)


def test_simpo_by_hand_needs_no_reference():
    chosen, rejected = _t(-2.0), _t(-6.0)
    loss, r_chosen, r_rejected = simpo_loss(chosen, rejected, torch.tensor([4.0]), torch.tensor([3.0]),
                                            beta=2.0, gamma=0.5)
    # rewards 2 * -2/4 = -1 and 2 * -6/3 = -4: z = -1 + 4 - 0.5 = 2.5
    assert (float(r_chosen), float(r_rejected)) == pytest.approx((-1.0, -4.0))
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-2.5)), abs=1e-12)
    loss.sum().backward()
    assert chosen.grad < 0 < rejected.grad


def test_pairwise_reward_loss_by_hand_with_and_without_margin():
    chosen, rejected = _t(1.0, 0.0), _t(0.5, 1.0)
    loss = pairwise_reward_loss(chosen, rejected)
    # gaps 0.5 and -1.0: -log sigmoid(gap)
    assert loss.tolist() == pytest.approx([-math.log(_sig(0.5)), -math.log(_sig(-1.0))], abs=1e-12)
    with_margin = pairwise_reward_loss(chosen, rejected, torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert with_margin.tolist() == pytest.approx([math.log(2.0), -math.log(_sig(-1.0))], abs=1e-12)  # gap 0
    loss.sum().backward()
    assert chosen.grad.tolist()[0] < 0 < rejected.grad.tolist()[0]  # descent raises chosen, lowers rejected
