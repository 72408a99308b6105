"""The learner's pure parts: padding, logprob gathering, minibatch plans, advantages per algorithm, prompt order,
run resolution. No Ray, no model."""

from __future__ import annotations

import math

import pytest
import torch

from rayalign.config import AlgorithmConfig, ConfigError, TrainerConfig
from rayalign.data.prompts import prompt_indices
from rayalign.learner import rl
from rayalign.learner.batch import (logits_from, minibatch_plan, pad_rollouts, response_positions, select_rows,
                                    token_logprobs)
from rayalign.learner.checkpoints import mark_complete, resolve_run
from rayalign.types import Rollout


def _rollout(prompt_ids, response_ids, logprobs=None):
    return Rollout(prompt="p", response="r", prompt_token_ids=tuple(prompt_ids), response_token_ids=tuple(response_ids),
                   logprobs=tuple(logprobs or [-1.0] * len(response_ids)), finish_reason="stop", policy_version=0,
                   engine_id=0)


def test_pad_rollouts_layout():
    batch = pad_rollouts([_rollout([5, 6, 7], [8, 9], [-0.5, -0.25]), _rollout([5], [4, 3, 2])])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 4, 3, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["response_start"].tolist() == [3, 1]
    assert batch["response_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["engine_logprobs"][0].tolist() == [-0.5, -0.25, 0.0]
    with pytest.raises(ValueError):
        pad_rollouts([])


def test_token_logprobs_pick_the_predicting_position():
    batch = pad_rollouts([_rollout([1, 2], [3, 0]), _rollout([1], [2, 3])])
    V = 4
    logits = torch.randn(2, batch["input_ids"].shape[1], V)
    positions = response_positions(batch["response_start"], 2, batch["input_ids"].shape[1])
    logp, selected = token_logprobs(logits, batch["input_ids"], positions, temperature=0.5)
    assert positions.tolist() == [[1, 2], [0, 1]]
    # by hand: response token t of row b is input_ids[b, start + t], predicted by logits[b, start + t - 1]
    for b, start in enumerate([2, 1]):
        for t in range(2):
            expected = torch.log_softmax(logits[b, start + t - 1] / 0.5, -1)[batch["input_ids"][b, start + t]]
            assert math.isclose(logp[b, t].item(), expected.item(), rel_tol=1e-5)
    assert selected.shape == (2, 2, V)
    # the same from the logits of positions >= logits_from(...) only (what the learner asks HF for)
    mask = batch["response_mask"]
    assert logits_from(positions, mask) == 0 and logits_from(positions[:1], mask[:1]) == 1
    padded = select_rows(batch, [0, -1])  # a padding row (no response) does not pull the first position to 0
    assert logits_from(response_positions(padded["response_start"], 2, 4), padded["response_mask"]) == 1
    assert logits_from(positions, torch.zeros_like(mask)) == 0
    logp_tail, _ = token_logprobs(logits[:1, 1:], batch["input_ids"][:1], positions[:1], 0.5, first=1)
    assert torch.allclose(logp_tail, logp[:1])


def test_minibatch_plan_covers_rows_once_per_epoch_and_pads_evenly():
    plan = minibatch_plan(num_samples=10, minibatch_size=8, num_workers=2, micro_batch_size=2, epochs=2,
                          generator=torch.Generator().manual_seed(0))
    assert len(plan) == 4  # 2 minibatches per epoch (8 + 2 real rows), 2 epochs
    for epoch in (plan[:2], plan[2:]):
        rows = [r for mb in epoch for rank in mb for micro in rank for r in micro]
        assert sorted(r for r in rows if r >= 0) == list(range(10))
        assert rows.count(-1) == 6
    for mb in plan:  # every rank runs the same number of equally sized micro-batches: collectives line up
        assert [len(rank) for rank in mb] == [2, 2]
        assert all(len(micro) == 2 for rank in mb for micro in rank)
    with pytest.raises(ValueError, match="not a multiple"):
        minibatch_plan(10, 6, 2, 2, 1, torch.Generator())


def test_minibatch_plan_keeps_groups_in_micro_batches():
    """With each row's group (its prompt), a minibatch's rows are the same as without, ordered group by group and
    dealt to ranks a micro-batch at a time: every micro-batch holds one group of 4."""
    groups = [i // 4 for i in range(16)]  # 4 prompts x 4 samples, as GRPO's batch lays them out
    plain = minibatch_plan(16, 16, 2, 4, 2, torch.Generator().manual_seed(3))
    grouped = minibatch_plan(16, 16, 2, 4, 2, torch.Generator().manual_seed(3), groups=groups)
    for a, b in zip(plain, grouped):
        assert sorted(r for rank in a for micro in rank for r in micro) == sorted(
            r for rank in b for micro in rank for r in micro)
        assert [len(rank) for rank in b] == [2, 2] and all(len(micro) == 4 for rank in b for micro in rank)
        assert all(len({groups[r] for r in micro}) == 1 for rank in b for micro in rank)
    assert any(len({groups[r] for r in micro if r >= 0}) > 1 for mb in plain for rank in mb for micro in rank)
    assert grouped[0] != grouped[1]  # each epoch still shuffles (the group order, and rows within a group)
    # an odd batch: padding rows at the end, groups still contiguous
    padded = minibatch_plan(6, 8, 1, 4, 1, torch.Generator().manual_seed(0), groups=[0, 0, 1, 1, 1, 2])
    rows = [r for micro in padded[0][0] for r in micro]
    assert rows[-2:] == [-1, -1]
    labels = [[0, 0, 1, 1, 1, 2][r] for r in rows[:6]]
    assert all(labels.index(g) + labels.count(g) - 1 == len(labels) - 1 - labels[::-1].index(g) for g in labels)


def test_select_rows_pads_with_masked_rows_that_still_attend_somewhere():
    batch = pad_rollouts([_rollout([1, 2], [3]), _rollout([4], [5, 6])])
    picked = select_rows(batch, [1, -1])
    assert picked["input_ids"][0].tolist() == batch["input_ids"][1].tolist()
    assert picked["response_mask"][1].sum() == 0
    assert picked["attention_mask"][1].tolist() == [1, 0, 0]


def test_grpo_and_rloo_advantages_by_hand():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0])
    zeros = torch.zeros(4, 2)
    grpo = rl.advantages(AlgorithmConfig(name="grpo", kl_in="loss"), scores, mask, zeros, zeros, None, 0.1, 2)
    # group 1: mean 2, std 1 -> -1, +1 (every real token); group 2: identical scores -> 0
    assert torch.allclose(grpo["advantages"], torch.tensor([[-1.0, -1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]),
                          atol=1e-5)
    rloo = rl.advantages(AlgorithmConfig(name="rloo"), scores, mask, zeros, zeros, None, 0.1, 2)
    assert torch.allclose(rloo["advantages"][:, 0], torch.tensor([-2.0, 2.0, 0.0, 0.0]))
    # KL in the reward: sequence KL (sum over tokens) * coef comes off the score before the baseline
    logprobs = torch.tensor([[0.5, 0.5], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    shaped = rl.advantages(AlgorithmConfig(name="rloo", kl_in="reward"), scores, mask, logprobs, zeros, None, 1.0, 2)
    assert torch.allclose(shaped["advantages"][:, 0], torch.tensor([-3.0, 3.0, 0.0, 0.0]))
    # with the KL in the loss the group advantages read no logprobs: the driver may skip the old-policy pass
    assert not rl.needs_logprobs(AlgorithmConfig(name="grpo", kl_in="loss"))
    no_logprobs = rl.advantages(AlgorithmConfig(name="grpo", kl_in="loss"), scores, mask, None, None, None, 0.1, 2)
    assert torch.equal(no_logprobs["advantages"], grpo["advantages"])
    assert rl.needs_logprobs(AlgorithmConfig(name="rloo", kl_in="reward"))
    assert rl.needs_logprobs(AlgorithmConfig(name="ppo", kl_in="loss"))
    with pytest.raises(ValueError, match="needs the old-policy and reference logprobs"):
        rl.advantages(AlgorithmConfig(name="rloo", kl_in="reward"), scores, mask, None, None, None, 1.0, 2)
    # a KL coefficient of 0 runs no reference: the KL in the reward is then 0, not an error
    no_ref = rl.advantages(AlgorithmConfig(name="rloo", kl_in="reward", kl_coef=0.0), scores, mask, logprobs, None,
                           None, 0.0, 2)
    assert torch.equal(no_ref["advantages"], rloo["advantages"])
    with pytest.raises(ValueError, match="needs the old-policy and reference logprobs"):
        rl.advantages(AlgorithmConfig(name="rloo", kl_in="reward"), scores, mask, logprobs, None, None, 1.0, 2)


def test_ppo_advantages_use_the_values_and_shaped_rewards():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 9.0]])
    out = rl.advantages(AlgorithmConfig(name="ppo", whiten_advantages=False, gamma=1.0, lam=1.0, kl_in="reward"),
                        torch.tensor([1.0]), mask, torch.tensor([[0.2, 0.0, 0.0]]), torch.zeros(1, 3), values, 0.5, 1)
    # token rewards: [-0.5*0.2, 1.0]; with gamma = lam = 1 the advantage is the reward-to-go minus V
    assert torch.allclose(out["advantages"], torch.tensor([[0.9 - 0.5, 1.0 - 0.25, 0.0]]))
    assert torch.allclose(out["returns"], torch.tensor([[0.9, 1.0, 0.0]]))
    # no reference (KL coefficient 0): the shaped rewards are the score alone
    no_ref = rl.advantages(AlgorithmConfig(name="ppo", whiten_advantages=False, gamma=1.0, lam=1.0, kl_in="reward",
                                           kl_coef=0.0), torch.tensor([1.0]), mask, torch.tensor([[0.2, 0.0, 0.0]]),
                           None, values, 0.0, 1)
    assert torch.allclose(no_ref["advantages"], torch.tensor([[1.0 - 0.5, 1.0 - 0.25, 0.0]]))
    with pytest.raises(ValueError, match="value head"):
        rl.advantages(AlgorithmConfig(name="ppo"), torch.tensor([1.0]), mask, values, values, None, 0.5, 1)


def test_prompt_order_is_a_pure_function_of_seed_and_step():
    first_epoch = [i for step in range(1, 6) for i in prompt_indices(10, 2, step, seed=3)]
    assert sorted(first_epoch) == list(range(10))  # every prompt once per epoch
    assert prompt_indices(10, 2, 4, seed=3) == prompt_indices(10, 2, 4, seed=3)
    assert first_epoch != [i for step in range(1, 6) for i in prompt_indices(10, 2, step, seed=4)]
    second_epoch = [i for step in range(6, 11) for i in prompt_indices(10, 2, step, seed=3)]
    assert sorted(second_epoch) == list(range(10)) and second_epoch != first_epoch


def test_resolve_run(tmp_path):
    assert resolve_run(TrainerConfig(storage_path=str(tmp_path), run_name="a")) == (str(tmp_path), "a", None, False)
    with pytest.raises(ConfigError, match="no run with a checkpoint"):
        resolve_run(TrainerConfig(storage_path=str(tmp_path), resume=True))
    (tmp_path / "a" / "checkpoint_000003").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no run with a checkpoint"):  # not marked complete: a killed save
        resolve_run(TrainerConfig(storage_path=str(tmp_path), resume=True))
    mark_complete(str(tmp_path), "a", 3)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        resolve_run(TrainerConfig(storage_path=str(tmp_path), run_name="a"))
    latest = str(tmp_path / "a" / "checkpoint_000003")
    assert resolve_run(TrainerConfig(storage_path=str(tmp_path), resume=True)) == (str(tmp_path), "a", latest, False)
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        resolve_run(TrainerConfig(storage_path=str(tmp_path), run_name="b", resume=True))

    # resume_from: a new run starting from a chosen complete checkpoint, possibly in another storage
    (tmp_path / "a" / "checkpoint_000001").mkdir()
    mark_complete(str(tmp_path), "a", 1)
    (tmp_path / "a" / "checkpoint_000002").mkdir()  # interrupted save
    other = tmp_path / "elsewhere"
    chosen = str(tmp_path / "a" / "checkpoint_000001")
    assert resolve_run(TrainerConfig(storage_path=str(other), run_name="fork", resume_from=chosen + "/")) == (
        str(other), "fork", chosen, True)
    with pytest.raises(ConfigError, match="not a complete checkpoint.*complete ones in .*: \\[1, 3\\]"):
        resolve_run(TrainerConfig(storage_path=str(other), resume_from=str(tmp_path / "a" / "checkpoint_000002")))
    with pytest.raises(ConfigError, match="expected <storage>/<run>/checkpoint_<step>"):
        resolve_run(TrainerConfig(storage_path=str(other), resume_from=str(tmp_path / "a")))
    with pytest.raises(ConfigError, match="pick one"):
        resolve_run(TrainerConfig(storage_path=str(tmp_path), resume=True, resume_from=chosen))
    with pytest.raises(ConfigError, match="already holds checkpoints"):  # forking into an existing run
        resolve_run(TrainerConfig(storage_path=str(tmp_path), run_name="a", resume_from=chosen))


def test_exported_weights_equal_peft_merge_and_unload():
    """What the learner publishes under lora_sync=merged (and saves as the merged model): HF names in the HF
    state dict's order, base + scale * B @ A, the model untouched."""
    import copy
    import types

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from rayalign.learner.export import export_weights
    from rayalign.learner.model import TrainedModel

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    lm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                         init_lora_weights=False))
    expected = copy.deepcopy(lm).merge_and_unload().state_dict()
    def worker(model, finetune):
        return TrainedModel(policy=types.SimpleNamespace(lm=model), engine=None, reference=None, zero3=False,
                            finetune=finetune)

    merged = dict(export_weights(worker(lm, "lora")))
    assert list(merged) == list(expected)
    for name, tensor in expected.items():
        assert torch.allclose(merged[name], tensor, atol=1e-6), name
    assert not torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"],
                              lm.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight)
    # full fine-tuning: the model's own state dict, in its order
    full = LlamaForCausalLM(base.config)
    exported = list(export_weights(worker(full, "full")))
    assert [(n, t.data_ptr()) for n, t in exported] == [(n, t.data_ptr()) for n, t in full.state_dict().items()]
    # tied input and output embeddings (as in SmolLM2) go once, under the input's name
    tied = LlamaForCausalLM(LlamaConfig(**{**base.config.to_dict(), "tie_word_embeddings": True}))
    names = [n for n, _ in export_weights(worker(tied, "full"))]
    assert names == [n for n in tied.state_dict() if n != "lm_head.weight"]


def test_rank_replies_are_put_back_in_row_order():
    from rayalign.learner.group import _in_row_order

    replies = [{"logprobs": torch.tensor([[2.0], [0.0]]), "values": None},
               {"logprobs": torch.tensor([[1.0, 9.0]]), "values": None}]  # ranks may differ in width
    out = _in_row_order(replies, [[2, 0], [1]], ("logprobs", "values"))
    assert out["logprobs"].tolist() == [[0.0, 0.0], [1.0, 9.0], [2.0, 0.0]] and out["values"] is None
    with pytest.raises(ValueError, match="not each of"):
        _in_row_order(replies, [[2, 2], [1]], ("logprobs",))
