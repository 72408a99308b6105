"""Packing: several (prompt, response) examples in one row, with attention kept inside each example.

A packed row concatenates whole examples; ``segment_ids`` (B, L) numbers them 1, 2, ... (0: padding) and
``position_ids`` (B, L) restart at 0 for each, so the model sees every example exactly as it would alone. The
attention is block-causal: a token attends to the tokens before it in its own segment (`attention_bias`; HF's
attention takes it as a 4D additive mask). The layout is the learner's usual one with every row's response
starting at token 1: ``response_start`` = 1 and ``response_mask`` (B, L - 1) marks the tokens whose prediction
counts (the responses'), so the logprobs and losses need nothing new.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import torch

from rayalign.types import Rollout


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: the indices of the examples in each packed row, every row's total length at most
    ``capacity``. Longest first, each into the row it fills best (ties: the earliest row); deterministic, so a
    resumed run packs the same rows. An example longer than ``capacity`` is an error (the job drops those first)."""
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens, over the pack capacity {capacity}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([i])
            bisect.insort(free, (capacity - lengths[i], len(rows) - 1))
        else:
            space, row = free.pop(at)
            rows[row].append(i)
            bisect.insort(free, (space - lengths[i], row))
    return rows


def packed_batch(examples: Sequence[Rollout], packs: Sequence[Sequence[int]],
                 pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """The rows ``packs`` (lists of indices into ``examples``) as tensors: ``input_ids``, ``attention_mask``,
    ``segment_ids``, ``position_ids`` (B, L), ``response_start`` (B,) = 1 and ``response_mask`` (B, L - 1), where
    column t stands for token t + 1 (predicted by position t)."""
    if not packs:
        raise ValueError("cannot pack an empty batch")
    seqs = [[list(examples[i].prompt_token_ids) + list(examples[i].response_token_ids) for i in p] for p in packs]
    L = max(2, max(sum(len(s) for s in row) for row in seqs))
    B = len(packs)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    segment_ids = torch.zeros((B, L), dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    response_mask = torch.zeros((B, L - 1), dtype=torch.float32)
    for b, (row, pack_indices) in enumerate(zip(seqs, packs)):
        at = 0
        for segment, (ids, i) in enumerate(zip(row, pack_indices), start=1):
            n, prompt = len(ids), len(examples[i].prompt_token_ids)
            input_ids[b, at:at + n] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, at:at + n] = 1
            segment_ids[b, at:at + n] = segment
            position_ids[b, at:at + n] = torch.arange(n)
            response_mask[b, at + prompt - 1:at + n - 1] = 1.0  # tokens at + prompt .. at + n - 1
            at += n
    return {"input_ids": input_ids, "attention_mask": attention_mask, "segment_ids": segment_ids,
            "position_ids": position_ids, "response_start": torch.ones(B, dtype=torch.long),
            "response_mask": response_mask}


def attention_bias(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) segment ids -> (B, 1, L, L) additive attention mask: 0 where query i may attend key j (j <= i, same
    segment), the dtype's minimum elsewhere. Every token may attend itself, so padding rows stay finite."""
    L = segment_ids.shape[1]
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=segment_ids.device))
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] > 0)
    allowed = (same & causal) | torch.eye(L, dtype=torch.bool, device=segment_ids.device)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
