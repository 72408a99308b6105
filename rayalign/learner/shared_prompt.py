"""Pairs that share a prompt, run with the prompt once: the forward pass of the paired offline objectives.

A DPO-style micro-batch holds pairs in consecutive rows (chosen at 2i, rejected at 2i + 1) with the same prompt.
A plain forward runs each prompt twice; here the prompts run once, left-padded, with the KV cache kept (and
gradients flowing through it), the cache is repeated for the two responses of each pair, and the responses run
on top of it. The first response token is predicted by the prompt's last position, the others by the response's
own. On the shipped vegetarian pairs the prompts are about a third of the tokens, so this skips about a sixth of
the work; the logprobs agree with a plain forward's to float32 rounding (`tests/test_shared_prompt.py`).
"""

from __future__ import annotations

from typing import Any

import torch


def shares_prompts(mb: dict[str, torch.Tensor]) -> bool:
    """Whether rows 2i and 2i + 1 hold the same prompt tokens (what the paired objectives' batches hold)."""
    starts = mb["response_start"]
    if starts.numel() % 2 or not torch.equal(starts[0::2], starts[1::2]):
        return False
    ids, width = mb["input_ids"], int(starts.max())
    prompt = torch.arange(width)[None, :] < starts[0::2, None]
    return bool(((ids[0::2, :width] == ids[1::2, :width]) | ~prompt).all())


def paired_response_logits(lm: Any, input_ids: torch.Tensor, response_start: torch.Tensor,
                           response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, T, V) whose position t predicts response token t of each row, and those tokens (B, T), for
    rows that pair up on a shared prompt (`shares_prompts`). ``lm`` is an HF causal LM (peft-wrapped or not).

    input_ids (B, L) right-padded prompt + response; response_start (B,); response_mask (B, T). A padding pair
    (no prompt) runs on one pad token and is masked out by its all-zero response mask.
    """
    B, T = response_mask.shape
    device = input_ids.device
    prompt_len = response_start[0::2].clamp(min=1)
    width = int(prompt_len.max())
    # the prompts, left-padded so that every one ends at the same position and the responses follow it
    source = torch.arange(width, device=device)[None, :] - (width - prompt_len)[:, None]
    real = source >= 0
    prompt_ids = torch.where(real, input_ids[0::2].gather(1, source.clamp(min=0)), 0)
    prompt_mask = real.long()
    out = lm(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=source.clamp(min=0), use_cache=True,
             logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(2)  # each prompt's keys and values for both of its responses (differentiable)
    offsets = torch.arange(T, device=device)[None, :]
    targets = input_ids.gather(1, (response_start[:, None] + offsets).clamp(max=input_ids.shape[1] - 1))
    targets = targets * response_mask.long()
    first = out.logits[:, -1:].repeat_interleave(2, dim=0)
    if T == 1:
        return first, targets
    # the responses but their last token, which predicts nothing
    attention = torch.cat([prompt_mask.repeat_interleave(2, dim=0), response_mask[:, :-1].long()], dim=1)
    positions = prompt_len.repeat_interleave(2)[:, None] + offsets[:, :-1]
    follow = lm(input_ids=targets[:, :-1], attention_mask=attention, position_ids=positions, past_key_values=cache,
                use_cache=True).logits
    return torch.cat([first, follow], dim=1), targets


def aligned_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Response-aligned logits (B, T, V) and tokens (B, T) -> logprobs (B, T) under ``logits / temperature``,
    and those temperature-scaled float logits (for the entropy)."""
    selected = logits.float() if temperature == 1.0 else logits.float() / temperature
    return torch.log_softmax(selected, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1), selected


def paired_logprobs(lm: Any, mb: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Response logprobs (B, T) of a paired micro-batch, each prompt run once (`paired_response_logits`)."""
    logits, targets = paired_response_logits(lm, mb["input_ids"], mb["response_start"], mb["response_mask"])
    return aligned_logprobs(logits, targets, temperature)[0]


def plain_logprobs(lm: Any, mb: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """The same logprobs from one forward over whole rows (every prompt run for each of its responses)."""
    from rayalign.learner.batch import logits_from, response_positions, token_logprobs

    input_ids = mb["input_ids"]
    positions = response_positions(mb["response_start"], mb["response_mask"].shape[1], input_ids.shape[1])
    first = logits_from(positions, mb["response_mask"])
    logits = lm(input_ids=input_ids, attention_mask=mb["attention_mask"], logits_to_keep=input_ids.shape[1] - first,
                use_cache=False).logits
    return token_logprobs(logits, input_ids, positions.clamp(min=first), temperature, first)[0]
