"""Records passed between components (rollout engines, judge, learner, trackers)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One sampled response.

    ``logprobs[i]`` is the engine's log-probability of ``response_token_ids[i]`` under the sampling distribution
    (after temperature), shape ``(T,)`` with ``T = len(response_token_ids)``.
    """

    prompt: str
    response: str
    prompt_token_ids: tuple[int, ...]
    response_token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str
    policy_version: int
    engine_id: int
