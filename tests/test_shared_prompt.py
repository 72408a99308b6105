"""Pairs run with their shared prompt once (rayalign.learner.shared_prompt) give the plain forward's logprobs and
gradients, on the real SmolLM2 with a LoRA adapter, a padding pair included."""

from __future__ import annotations

import pytest
import torch

from rayalign.learner.batch import pad_rollouts, select_rows
from rayalign.learner.shared_prompt import paired_logprobs, plain_logprobs, shares_prompts


@pytest.fixture(scope="module")
def lora_lm(model_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    lm = get_peft_model(lm, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                       init_lora_weights=False))  # random B: the adapter changes the logprobs
    lm.eval()
    return lm


@pytest.fixture(scope="module")
def pairs_batch(model_path):
    from transformers import AutoTokenizer

    from rayalign.data.preferences import load_preferences, tokenize

    examples = load_preferences("builtin:vegetarian/pairs", limit=3).examples
    rows = tokenize(examples, AutoTokenizer.from_pretrained(model_path))
    batch = pad_rollouts([r for ex in rows for r in ex])
    return select_rows(batch, [0, 1, 2, 3, -1, -1, 4, 5])  # a padding pair in the middle, as pair_plan makes


def test_shared_prompt_logprobs_and_gradients_match_the_plain_forward(lora_lm, pairs_batch):
    assert shares_prompts(pairs_batch)
    mask = pairs_batch["response_mask"]
    grads = {}
    for name, fn in (("plain", plain_logprobs), ("shared", paired_logprobs)):
        lora_lm.zero_grad()
        logprobs = fn(lora_lm, pairs_batch, 0.7)
        ((logprobs * mask).sum(dim=1) * torch.tensor([1.0, -1.0, 0.5, 2.0, 0, 0, -0.3, 1.0])).sum().backward()
        grads[name] = ({n: p.grad.clone() for n, p in lora_lm.named_parameters() if p.requires_grad}, logprobs)
    (plain_grads, plain), (shared_grads, shared) = grads["plain"], grads["shared"]
    real = mask.bool()
    assert torch.allclose(plain[real], shared[real], atol=2e-4), float((plain - shared)[real].abs().max())
    assert (shared[~real] == 0).all() or torch.isfinite(shared[~real]).all()
    for n, g in plain_grads.items():  # float32 sums in another order: equal to ~1e-5 of the gradient's norm
        assert float((g - shared_grads[n]).norm() / g.norm()) < 1e-3, (n, float((g - shared_grads[n]).norm() / g.norm()))


def test_rows_that_do_not_pair_up_are_left_to_the_plain_forward(pairs_batch):
    swapped = select_rows(pairs_batch, [0, 2, 1, 3, 4, 5, 6, 7])  # rows 0 and 2 hold different prompts
    assert not shares_prompts(swapped)
    assert not shares_prompts(select_rows(pairs_batch, [0, 1, 2]))  # an odd number of rows
