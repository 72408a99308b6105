"""The learner's maths on a CUDA device: logprob gathering matches the CPU, and PPO updates of a small random Llama
lower the loss on a fixed batch. Skipped without a GPU (conftest)."""

from __future__ import annotations

import pytest
import torch

from rayalign.algorithms.ppo import policy_loss
from rayalign.learner.batch import pad_rollouts, response_positions, token_logprobs
from rayalign.types import Rollout

pytestmark = pytest.mark.gpu


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))


def _batch():
    g = torch.Generator().manual_seed(1)
    rollouts = []
    for b in range(8):
        p = torch.randint(1, 256, (5 + b,), generator=g).tolist()
        r = torch.randint(1, 256, (12 - b,), generator=g).tolist()
        rollouts.append(Rollout("p", "r", tuple(p), tuple(r), tuple([-1.0] * len(r)), "stop", 0, 0))
    return pad_rollouts(rollouts)


def _logprobs(model, batch, device):
    ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    pos = response_positions(batch["response_start"].to(device), batch["response_mask"].shape[1], ids.shape[1])
    logits = model(input_ids=ids, attention_mask=attn).logits
    return token_logprobs(logits, ids, pos, temperature=0.7)[0]


def test_logprobs_on_gpu_match_cpu():
    model, batch = _tiny_llama().float(), _batch()
    with torch.no_grad():
        cpu = _logprobs(model, batch, "cpu")
        gpu = _logprobs(model.to("cuda"), batch, "cuda").cpu()
    mask = batch["response_mask"].bool()
    assert torch.allclose(cpu[mask], gpu[mask], atol=1e-3)


def test_ppo_updates_lower_the_loss_on_gpu():
    model, batch = _tiny_llama().to("cuda"), _batch()
    mask = batch["response_mask"].to("cuda")
    with torch.no_grad():
        old = _logprobs(model, batch, "cuda")
    advantages = torch.linspace(-1, 1, 8, device="cuda")[:, None].expand_as(old) * mask
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logprobs = _logprobs(model, batch, "cuda")
        loss, _ = policy_loss(logprobs.float(), old, advantages, mask, clip_eps=0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
