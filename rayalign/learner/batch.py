"""Turning rollouts into padded tensors, planning minibatches, and reading per-token logprobs out of logits.

Shapes: B sequences; L = longest prompt + response (right-padded); T = longest response; V = vocabulary.
Response token ``t`` of sequence ``b`` sits at ``input_ids[b, response_start[b] + t]`` and is predicted by the
logits at the position before it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rayalign.types import Rollout


def pad_rollouts(rollouts: Sequence[Rollout], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Rollouts -> ``input_ids`` (B, L), ``attention_mask`` (B, L), ``response_start`` (B,), ``response_mask`` (B, T)
    and ``engine_logprobs`` (B, T) (what the engine reported, for the engine-vs-learner mismatch metric)."""
    if not rollouts:
        raise ValueError("cannot pad an empty batch")
    lengths = [len(r.prompt_token_ids) + len(r.response_token_ids) for r in rollouts]
    L = max(lengths)
    T = max(1, max(len(r.response_token_ids) for r in rollouts))
    B = len(rollouts)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    response_mask = torch.zeros((B, T), dtype=torch.float32)
    engine_logprobs = torch.zeros((B, T), dtype=torch.float32)
    response_start = torch.zeros(B, dtype=torch.long)
    for b, r in enumerate(rollouts):
        ids = list(r.prompt_token_ids) + list(r.response_token_ids)
        input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, :len(ids)] = 1
        response_start[b] = len(r.prompt_token_ids)
        n = len(r.response_token_ids)
        response_mask[b, :n] = 1.0
        if r.logprobs:
            engine_logprobs[b, :len(r.logprobs)] = torch.tensor(r.logprobs, dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_start": response_start,
            "response_mask": response_mask, "engine_logprobs": engine_logprobs}


def response_positions(response_start: torch.Tensor, T: int, L: int) -> torch.Tensor:
    """(B,) starts -> (B, T) positions of the logits that predict each response token (clamped inside the row)."""
    idx = response_start[:, None] - 1 + torch.arange(T, device=response_start.device)[None, :]
    return idx.clamp(min=0, max=L - 2)


def logits_from(positions: torch.Tensor, response_mask: torch.Tensor) -> int:
    """The first position whose logits a forward pass must produce, over the rows that have a response (padding
    rows have none; clamp their positions to it): the language-model head (a 49k-vocabulary matmul) then runs on
    the response part alone (HF ``logits_to_keep = L - first``), not on the prompts."""
    real = response_mask.bool().any(dim=1)
    return int(positions[real].min()) if bool(real.any()) else 0


def gather_response(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pick rows of ``hidden`` (B, L, ...) at ``positions`` (B, T) -> (B, T, ...)."""
    index = positions
    for _ in range(hidden.dim() - 2):
        index = index.unsqueeze(-1)
    return hidden.gather(1, index.expand(*positions.shape, *hidden.shape[2:]))


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
                   temperature: float = 1.0, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the response tokens under ``logits / temperature``.

    logits (B, L - first, V): the logits of positions ``first`` .. L-1 (all of them by default; see `logits_from`),
    input_ids (B, L), positions (B, T) from `response_positions`.
    Returns logprobs (B, T) and the selected, temperature-scaled float logits (B, T, V) (for the entropy).
    """
    selected = gather_response(logits, positions - first).float() / temperature
    targets = input_ids.gather(1, positions + 1)
    logp = torch.log_softmax(selected, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, selected


def minibatch_plan(num_samples: int, minibatch_size: int, num_workers: int, micro_batch_size: int, epochs: int,
                   generator: torch.Generator, groups: Sequence | None = None) -> list[list[list[list[int]]]]:
    """Which rows each worker trains on: ``plan[minibatch][rank][micro] = [row indices]`` (-1 = a padding row).

    Each epoch shuffles the rows and cuts them into minibatches of ``minibatch_size`` (the last one padded), so
    every worker runs the same number of micro-batches per optimizer step: the collective calls line up even when
    failed judgements left an odd number of samples.

    ``groups`` (each row's group: e.g. its prompt): within each minibatch the rows are ordered group by group
    (groups in their shuffled order) and dealt to the ranks a micro-batch at a time, so the rows of a group share
    micro-batches and a packed forward runs their prompt once (`rayalign.learner.packing.pack_micro_batch`).
    Which rows share a micro-batch does not change the step: its loss is a mean over the minibatch either way.
    """
    per_step = micro_batch_size * num_workers
    if minibatch_size % per_step:
        raise ValueError(f"minibatch_size {minibatch_size} is not a multiple of micro_batch_size x num_workers "
                         f"({micro_batch_size} x {num_workers})")
    accumulation = minibatch_size // per_step
    plan = []
    for _ in range(epochs):
        order = torch.randperm(num_samples, generator=generator).tolist()
        for start in range(0, num_samples, minibatch_size):
            rows = order[start:start + minibatch_size]
            if groups is not None:
                rank = {}
                for r in rows:
                    rank.setdefault(groups[r], len(rank))
                rows = sorted(rows, key=lambda r: rank[groups[r]])  # stable: shuffled within each group
                rows += [-1] * (minibatch_size - len(rows))
                micros = [rows[m * micro_batch_size:(m + 1) * micro_batch_size]
                          for m in range(accumulation * num_workers)]
                plan.append([micros[r::num_workers] for r in range(num_workers)])
                continue
            rows += [-1] * (minibatch_size - len(rows))
            plan.append(_layout(rows, num_workers, micro_batch_size, accumulation))
    return plan


def _layout(rows: list[int], num_workers: int, micro_batch_size: int, accumulation: int) -> list[list[list[int]]]:
    """One minibatch's rows -> [rank][micro] (round-robin over ranks so real rows spread evenly when the
    minibatch is padded)."""
    per_rank = [rows[r::num_workers] for r in range(num_workers)]
    return [[part[m * micro_batch_size:(m + 1) * micro_batch_size] for m in range(accumulation)]
            for part in per_rank]


def pair_plan(num_pairs: int, minibatch_size: int, num_workers: int, micro_batch_size: int, epochs: int,
              generator: torch.Generator, lengths: Sequence[int] | None = None) -> list[list[list[list[int]]]]:
    """`minibatch_plan` over pairs whose rows are ``2p`` (chosen) and ``2p + 1`` (rejected): sizes count pairs, and
    both rows of a pair land in the same micro-batch, next to each other (a padding pair is two -1 rows).

    ``lengths`` (tokens of each pair's longer row): within each minibatch the pairs are dealt out longest first,
    so a micro-batch holds pairs of like length and `trim` leaves it little padding. Which pairs share a
    micro-batch does not change the step: the loss is a mean over the minibatch's pairs either way."""
    plan = minibatch_plan(num_pairs, minibatch_size, num_workers, micro_batch_size, epochs, generator)
    if lengths is not None:
        accumulation = minibatch_size // (micro_batch_size * num_workers)
        for i, minibatch in enumerate(plan):
            pairs = sorted((p for rank in minibatch for micro in rank for p in micro if p >= 0),
                           key=lambda p: -lengths[p])
            pairs += [-1] * (minibatch_size - len(pairs))
            plan[i] = _layout(pairs, num_workers, micro_batch_size, accumulation)
    return [[[[row for p in micro for row in ((2 * p, 2 * p + 1) if p >= 0 else (-1, -1))] for micro in rank]
             for rank in minibatch] for minibatch in plan]


def trim(mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A micro-batch cut to its own longest sequence and response: the (B, L) tensors (``input_ids``,
    ``attention_mask``, packed rows' ``segment_ids``) to the longest row's tokens, the (B, T) per-response-token
    ones to the last response column any row uses.
    Rows are right-padded, so only padding goes. Forward results of the cut batch are (B, T') with T' <= T."""
    if "attention_mask" not in mb or "response_mask" not in mb:
        return mb
    L, T = mb["attention_mask"].shape[1], mb["response_mask"].shape[1]
    if L == T:
        return mb
    width = min(L, max(2, int(mb["attention_mask"].sum(dim=1).max())))  # a padding-only one keeps 2 columns
    # up to the last response column in use (packed rows' responses do not start at column 0)
    used = mb["response_mask"].any(dim=0).nonzero()
    tokens = int(used[-1]) + 1 if len(used) else 1
    out = {}
    for name, t in mb.items():
        if t.dim() >= 2 and t.shape[1] == L:
            t = t[:, :width]
        elif t.dim() >= 2 and t.shape[1] == T:
            t = t[:, :tokens]
        out[name] = t
    return out


def pad_to(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, T') -> (B, tokens), zeros on the right: a trimmed micro-batch's result back at the batch's width."""
    return torch.nn.functional.pad(x, (0, tokens - x.shape[1])) if x.shape[1] < tokens else x


def select_rows(batch: dict[str, torch.Tensor], rows: Sequence[int]) -> dict[str, torch.Tensor]:
    """Rows of every (B, ...) tensor in ``batch``; index -1 gives an all-zero row (masked out everywhere)."""
    index = torch.tensor([max(r, 0) for r in rows], dtype=torch.long)
    keep = torch.tensor([r >= 0 for r in rows])
    out = {}
    for name, t in batch.items():
        picked = t.index_select(0, index).clone()
        picked[~keep] = 0
        out[name] = picked
    if "attention_mask" in out:
        out["attention_mask"][~keep, 0] = 1  # a row attending to nothing would make the attention NaN
    return out
