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


@dataclasses.dataclass(frozen=True)
class Judgement:
    """A reward for one (prompt, response). ``score`` in [0, 1] and ``reward`` are None when judging failed
    (unparsable answer, endpoint error): the caller drops that sample and counts it, never treats it as 0."""

    score: float | None
    reward: float | None
    raw: str = ""
    """What the judge itself generated (or a summary of its logprobs)."""
    error: str | None = None
    components: tuple[tuple[str, float], ...] = ()
    """Per-component rewards of a composite, in config order."""

    @property
    def ok(self) -> bool:
        return self.reward is not None
