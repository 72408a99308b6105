"""Packed rows (rayalign.learner.packing) on the real SmolLM2 in float32: the SFT loss of packed rows equals the
loss of the same examples padded one per row, no token sees another example's tokens, and the per-segment attention
the learner runs gives the block-causal mask's logits and gradients."""

from __future__ import annotations

import random

import pytest
import torch

from rayalign.learner.packing import SEGMENT_ATTENTION, attention_bias, pack, packed_batch, segment_spans
from rayalign.types import Rollout


def _rollout(prompt: list[int], response: list[int]) -> Rollout:
    return Rollout(prompt="p", response="r", prompt_token_ids=tuple(prompt), response_token_ids=tuple(response),
                   logprobs=(), finish_reason="stop", policy_version=0, engine_id=-1)


def test_pack_fills_rows_best_fit_and_keeps_every_example_once():
    lengths = [7, 3, 5, 2, 8, 1, 4]
    rows = pack(lengths, capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 3  # 30 tokens in rows of 10: best-fit decreasing leaves no row to spare
    assert rows == pack(lengths, capacity=10)  # deterministic: a resumed run packs the same rows
    with pytest.raises(ValueError, match="over the pack capacity 10"):
        pack([4, 11], capacity=10)


def test_packed_batch_layout_marks_each_response_and_restarts_positions():
    rows = [_rollout([1, 2, 3], [4, 5]), _rollout([6, 7], [8])]
    batch = packed_batch(rows, [[0, 1]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 2, 2, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    # column t stands for token t + 1: the responses are tokens 3, 4 and 7
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1, 0, 0, 1]]
    bias = attention_bias(batch["segment_ids"], torch.float32)[0, 0]
    allowed = bias == 0
    assert allowed[6, 5] and allowed[6, 6] and not allowed[6, 4] and not allowed[2, 3]
    assert segment_spans(torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])) == [
        [(0, 2), (2, 5), (5, 6)], [(0, 6)]]


@pytest.fixture(scope="module")
def smollm():
    from rayalign.config import LearnerConfig, LoraConfig
    from rayalign.learner.model import TrainedModel, build_policy
    from rayalign.models import resolve_model

    policy = build_policy(resolve_model("smollm2-135m-instruct"), LearnerConfig(finetune="full"), LoraConfig())
    policy.eval()
    policy.device = torch.device("cpu")  # stands in for the DeepSpeed engine: called and asked for its device
    return TrainedModel(policy, policy, None, zero3=False, finetune="full")


def _examples(n: int, seed: int = 0) -> list[Rollout]:
    rng = random.Random(seed)
    return [_rollout([rng.randrange(10, 40_000) for _ in range(rng.randrange(3, 12))],
                     [rng.randrange(10, 40_000) for _ in range(rng.randrange(1, 9))]) for _ in range(n)]


def _sft_loss(model, mb):
    from rayalign.learner.model import forward_outputs
    from rayalign.learner.objectives import sft_objective

    with torch.no_grad():
        return sft_objective(forward_outputs(model, mb, 1.0), mb)[0].item()


def test_packed_loss_equals_padded_loss(smollm):
    from rayalign.learner.batch import pad_rollouts, select_rows, trim

    examples = _examples(6)
    padded = _sft_loss(smollm, pad_rollouts(examples))
    lengths = [len(e.prompt_token_ids) + len(e.response_token_ids) for e in examples]
    packs = pack(lengths, capacity=32)
    assert len(packs) < len(examples)  # several examples share a row
    packed_rows = packed_batch(examples, packs)
    assert _sft_loss(smollm, packed_rows) == pytest.approx(padded, abs=1e-5)
    # through the learner's own micro-batch path: rows picked (a padding row among them) and trimmed
    picked = trim(select_rows(packed_rows, [*range(len(packs)), -1]))
    assert _sft_loss(smollm, picked) == pytest.approx(padded, abs=1e-5)


def test_no_token_attends_across_a_pack_boundary(smollm):
    from rayalign.learner.model import policy_forward

    first, second = _examples(2, seed=3)
    other = _rollout([t + 1 for t in first.prompt_token_ids], [t + 1 for t in first.response_token_ids])
    with torch.no_grad():
        a = policy_forward(smollm, packed_batch([first, second], [[0, 1]]), 1.0)[0]
        b = policy_forward(smollm, packed_batch([other, second], [[0, 1]]), 1.0)[0]
    start = len(first.prompt_token_ids) + len(first.response_token_ids)  # the second example's first token
    assert not torch.equal(a[0, :start - 1], b[0, :start - 1])  # the first example did change
    assert torch.equal(a[0, start:], b[0, start:])  # the second one's predictions did not move


def test_segment_attention_gives_the_masks_logits_and_gradients(smollm):
    """The learner's LM runs `segment_attention`; on the same packed rows (padding included) it must give what the
    4D block-causal mask gives, forward and backward."""
    lm = smollm.policy.lm
    assert lm.config._attn_implementation == SEGMENT_ATTENTION
    examples = _examples(7, seed=5)
    lengths = [len(e.prompt_token_ids) + len(e.response_token_ids) for e in examples]
    rows = packed_batch(examples, pack(lengths, capacity=40))
    assert rows["segment_ids"].shape[0] >= 2 and (rows["segment_ids"] == 0).any()  # rows of unlike fill

    real = rows["segment_ids"] > 0

    def run(**attention):
        lm.zero_grad()
        logits = lm(input_ids=rows["input_ids"], position_ids=rows["position_ids"], use_cache=False,
                    **attention).logits
        (logits.logsumexp(-1) * real).sum().backward()  # padding tokens see other keys under the mask: left out
        grads = torch.cat([p.grad.flatten() for p in lm.parameters() if p.grad is not None])
        lm.zero_grad()
        return logits.detach()[real], grads

    masked, masked_grad = run(attention_mask=attention_bias(rows["segment_ids"], torch.float32))
    spanned, spanned_grad = run(attention_mask=torch.ones_like(rows["input_ids"]),
                                segment_spans=segment_spans(rows["segment_ids"]))
    assert (masked - spanned).abs().max().item() < 1e-4
    assert ((masked_grad - spanned_grad).norm() / masked_grad.norm()).item() < 1e-5


# -- the RL learner's packed micro-batches (learner.packing): padded rows in, padded-layout results out -------


def _rl_micro_batch(seed: int = 7):
    """A trimmed RL micro-batch as the worker builds it: real chat prompts and answers (SmolLM2's tokenizer) of
    unlike lengths, right-padded, a group of four answers to one prompt among them, and a -1 padding row, with
    advantages for the clipped surrogate."""
    from transformers import AutoTokenizer

    from rayalign.learner.batch import pad_rollouts, select_rows, trim
    from rayalign.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    talk = [("What should I cook tonight?", "A lentil curry with rice and a little yoghurt on the side."),
            ("Any ideas for a picnic?", "Sandwiches."),
            ("How do I make a quick pasta sauce for two people after work?",
             "Soften garlic in olive oil, add a tin of tomatoes, simmer ten minutes and finish with basil."),
            ("Suggest a soup.", "Minestrone with beans, carrots and celery is hearty and cheap."),
            ("What goes well with tofu?", "Soy sauce, ginger and spring onions."),
            # a group: three more answers to the first prompt (its prompt runs once for all four, packed)
            ("What should I cook tonight?", "Pasta."),
            ("What should I cook tonight?", "Roast chicken with potatoes and gravy."),
            ("What should I cook tonight?", "Try a vegetable stir-fry with tofu, peppers and noodles in ginger soy.")]
    rollouts = []
    for question, answer in talk:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=False)
        rollouts.append(_rollout(tokenizer.encode(prompt, add_special_tokens=False), tokenizer.encode(answer) + [tokenizer.eos_token_id]))
    batch = pad_rollouts(rollouts)
    mb = trim(select_rows(batch, [3, 0, 5, -1, 4, 7, 1, 2, 6]))
    gen = torch.Generator().manual_seed(seed)
    mb["advantages"] = torch.randn(mb["response_mask"].shape, generator=gen) * mb["response_mask"]
    return mb


def _close(a, b, mask) -> float:
    """The largest difference of two (B, T) results on the masked-in tokens, relative to the size of the value
    (at least 1): float32 logprobs of -10 to -20 carry ~1e-6 of rounding, and the packed and padded passes run
    differently shaped matmuls and attention kernels."""
    return ((a - b).abs() / b.abs().clamp(min=1) * mask).max().item()


def _packed(model, on: bool):
    import dataclasses

    return dataclasses.replace(model, packing=on)


def test_pack_micro_batch_layout():
    from rayalign.learner.packing import pack_micro_batch, span_bias

    # rows 0 and 2 ask the same prompt [1, 2] (a group); row 1 another; row 3 is padding
    mb = {"input_ids": torch.tensor([[1, 2, 3, 4, 0], [5, 6, 7, 8, 9], [1, 2, 10, 0, 0], [0, 0, 0, 0, 0]]),
          "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]),
          "response_start": torch.tensor([2, 3, 2, 0]),
          "response_mask": torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])}
    packed = pack_micro_batch(mb)
    # the prompt [1, 2] once, then its two responses; then [5, 6, 7] and its response; the padding row left out
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 10, 5, 6, 7, 8, 9]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 2, 3, 4]]
    assert packed["spans"] == [[(0, 2), (2, 4, 0, 2), (4, 5, 0, 2), (5, 10)]]  # a prompt asked once: one span
    # token 0 of rows 0 and 2 is predicted by their shared prompt's last position (1); row 0's token 1 by its
    # token 0 (at 2); unused columns clamp inside the row; the padding row points at 0
    assert packed["positions"][[0, 1, 3]].tolist() == [[1, 2, 2], [7, 8, 8], [0, 0, 0]]
    assert packed["positions"][2, 0] == 1
    assert packed["targets"][:3, :2].tolist() == [[3, 4], [8, 9], [10, 0]]
    allowed = span_bias(packed["spans"], 10, torch.float32)[0, 0] == 0
    assert allowed[4, 0] and allowed[4, 1] and allowed[4, 4] and not allowed[4, 2] and not allowed[4, 3]
    assert allowed[9, 5] and allowed[9, 9] and not allowed[9, 4] and not allowed[1, 2] and not allowed[7, 8]
    alone = pack_micro_batch({k: v[3:] for k, v in mb.items()})  # a micro-batch of padding alone still runs
    assert alone["input_ids"].shape == (1, 2) and alone["positions"].tolist() == [[0, 0, 0]]


def test_packed_rl_logprobs_and_loss_equal_padded(smollm):
    """learner.packing: the policy's logprobs, the clipped-surrogate loss and its gradients equal the padded
    rows' to 1e-5 (float32; relative for the logprobs and gradients); the padding row's and unused columns'
    results are masked out the same."""
    from rayalign.algorithms.core import masked_mean
    from rayalign.config import AlgorithmConfig
    from rayalign.learner.model import forward_outputs, policy_forward
    from rayalign.learner.objectives import PolicyGradientSettings, clipped_policy_gradient

    mb = _rl_micro_batch()
    mask = mb["response_mask"]
    with torch.no_grad():
        padded = policy_forward(_packed(smollm, False), mb, 0.7)[0]
        packed = policy_forward(_packed(smollm, True), mb, 0.7)[0]
    assert packed.shape == padded.shape
    from rayalign.learner.packing import pack_micro_batch

    real = int(mb["attention_mask"][mb["response_mask"].sum(dim=1) > 0].sum())
    prompt = int(mb["response_start"][1])  # row 1 is the first prompt's: three more of its answers share it
    assert pack_micro_batch(mb)["input_ids"].shape[1] == real - 3 * prompt
    assert _close(packed, padded, mask) < 1e-5
    mb["logprobs"] = padded.detach() - 0.05 * mask  # an old policy a little off, so the ratio is not 1
    settings = PolicyGradientSettings.from_algorithm(AlgorithmConfig(name="grpo"), kl_coef=0.0)
    lm = smollm.policy.lm

    def loss_and_grads(on: bool):
        lm.zero_grad()
        loss, units, stats = clipped_policy_gradient(forward_outputs(_packed(smollm, on), mb, 0.7), mb, settings)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in lm.parameters() if p.grad is not None])
        lm.zero_grad()
        return loss.item(), units, float(stats["entropy"]), grads

    loss_a, units_a, entropy_a, grads_a = loss_and_grads(False)
    loss_b, units_b, entropy_b, grads_b = loss_and_grads(True)
    assert units_a == units_b == float(mask.sum())
    assert loss_b == pytest.approx(loss_a, abs=1e-5) and entropy_b == pytest.approx(entropy_a, abs=1e-4)
    assert ((grads_a - grads_b).norm() / grads_a.norm()).item() < 1e-5
    assert masked_mean(padded, mask).item() < 0  # real logprobs, not zeros


def test_packed_values_and_lora_reference_equal_padded():
    """The value head (PPO) reads the same hidden states packed; the LoRA reference (adapter off) the same
    logprobs."""
    from rayalign.config import LearnerConfig, LoraConfig
    from rayalign.learner.model import TrainedModel, build_policy, policy_forward, reference_logprobs
    from rayalign.models import resolve_model

    policy = build_policy(resolve_model("smollm2-135m-instruct"), LearnerConfig(finetune="lora"), LoraConfig(),
                          head="lm+value")
    policy.eval()
    policy.device = torch.device("cpu")
    with torch.no_grad():  # the adapter away from zero, so that switching it off changes the logprobs
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    model = TrainedModel(policy, policy, None, zero3=False, finetune="lora", head="lm+value")
    mb = _rl_micro_batch(seed=11)
    mask = mb["response_mask"]
    with torch.no_grad():
        lp_a, values_a, _ = policy_forward(_packed(model, False), mb, 1.0)
        lp_b, values_b, _ = policy_forward(_packed(model, True), mb, 1.0, with_logits=False)
        ref_a = reference_logprobs(_packed(model, False), mb, 1.0)
        ref_b = reference_logprobs(_packed(model, True), mb, 1.0)
    assert _close(lp_b, lp_a, mask) < 1e-5
    assert _close(values_b, values_a, mask) < 1e-5
    assert _close(ref_b, ref_a, mask) < 1e-5
    assert ((ref_a - lp_a).abs() * mask).max().item() > 1e-3  # the reference is not the adapted policy
