"""Rewards from a config: the LLM judge alone, or a weighted sum of judges, rule functions and reward models.

Every reward function maps (prompts, responses) to one `Judgement` each. A composite fails a sample when any of
its components failed on it (the caller drops and counts it); otherwise its reward is sum(w_i * reward_i), its
score the weighted mean of the component scores, and each component's reward is kept for logging.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Protocol, Sequence

from rayalign.config import ConfigError, JudgeConfig, RewardComponent, RewardConfig
from rayalign.judge.rules import RULES
from rayalign.judge.scoring import score_to_reward
from rayalign.types import Judgement


class RewardFunction(Protocol):
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Judgement]: ...


class RuleReward:
    def __init__(self, name: str, judge: JudgeConfig):
        if name not in RULES:
            raise ConfigError(f"unknown rule '{name}' (known: {', '.join(sorted(RULES))})")
        self.fn = RULES[name]
        self.transform, self.clamp = judge.transform, (judge.clamp[0], judge.clamp[1])

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Judgement]:
        scores = [self.fn(p, r) for p, r in zip(prompts, responses)]
        return [Judgement(s, score_to_reward(s, self.transform, self.clamp)) for s in scores]


class JudgeReward:
    """The LLM judge as a reward function; started on first use, so a composite of rules alone starts none."""

    def __init__(self, config: JudgeConfig):
        self.config = config
        self.backend: Any = None

    def start(self) -> None:
        """Deploy the judge without waiting for it (the Serve backend's engine loads in the background)."""
        if self.backend is None:
            self.backend = build_judge(self.config, wait=False)

    def wait_started(self) -> float:
        """Wait for a started judge; returns the seconds its start took (0 for an endpoint, which needs none)."""
        wait = getattr(self.backend, "wait_until_running", None)
        return wait() if wait else 0.0

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Judgement]:
        if self.backend is None:
            self.backend = build_judge(self.config)
        return self.backend.judge(prompts, responses)

    def shutdown(self) -> None:
        if self.backend is not None:
            self.backend.shutdown()


class CompositeReward:
    def __init__(self, parts: Sequence[tuple[str, float, RewardFunction]]):
        self.parts = list(parts)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 known: dict[str, list[Judgement]] | None = None) -> list[Judgement]:
        """One combined judgement per sample; ``known`` holds components already scored on these samples (by
        name, one judgement each), which are reused instead of scored again."""
        known = known or {}
        per_part = [(name, weight, known[name] if name in known else fn(prompts, responses))
                    for name, weight, fn in self.parts]
        return [combine([(name, weight, js[i]) for name, weight, js in per_part]) for i in range(len(prompts))]

    def part(self, name: str) -> RewardFunction:
        """The component called ``name`` on its own (KeyError naming the known ones when there is none)."""
        for part_name, _, fn in self.parts:
            if part_name == name:
                return fn
        raise KeyError(f"no reward component '{name}' (known: {', '.join(n for n, _, _ in self.parts)})")

    def start(self) -> None:
        """Start the components that load something (the judge) without waiting for them; `wait_started` waits.
        Without this they start at the first call."""
        for _, _, fn in self.parts:
            if hasattr(fn, "start"):
                fn.start()

    def wait_started(self) -> float:
        """Wait for what `start` began; returns the longest start in seconds. A judge deployment that fails to
        start raises JudgeUnavailableError."""
        return max([fn.wait_started() for _, _, fn in self.parts if hasattr(fn, "wait_started")], default=0.0)

    def shutdown(self) -> None:
        for _, _, fn in self.parts:
            if hasattr(fn, "shutdown"):
                fn.shutdown()


def judge_of(reward: Any) -> JudgeReward | None:
    """The LLM judge in a reward (itself, or a composite's judge component), None when it has none."""
    if isinstance(reward, JudgeReward):
        return reward
    return next((fn for _, _, fn in getattr(reward, "parts", ()) if isinstance(fn, JudgeReward)), None)


def combine(parts: Sequence[tuple[str, float, Judgement]]) -> Judgement:
    """One sample's composite judgement from its (name, weight, judgement) per component: failed when any
    component failed (named in the error), else reward = sum(w * reward), score = the |w|-weighted mean score."""
    failed = [(name, j) for name, _, j in parts if not j.ok]
    if failed:
        name, j = failed[0]
        return Judgement(None, None, raw=j.raw, error=f"{name}: {j.error}")
    total_weight = sum(abs(w) for _, w, _ in parts) or 1.0
    reward = sum(w * j.reward for _, w, j in parts)  # type: ignore[operator]
    score = sum(abs(w) * j.score for _, w, j in parts) / total_weight  # type: ignore[operator]
    raw = " | ".join(f"{name}: {j.raw}" for name, _, j in parts if j.raw)
    return Judgement(score, reward, raw=raw, components=tuple((name, j.reward) for name, _, j in parts))


def build_judge(config: JudgeConfig, wait: bool = True) -> Any:
    """The configured judge backend (an object with ``judge(prompts, responses)`` and ``shutdown()``);
    ``wait=False``: the Serve judge is deployed but not waited for (its first call waits)."""
    if config.backend == "openai":
        from rayalign.judge.openai_judge import OpenAIJudge

        return OpenAIJudge(config)
    from rayalign.models import resolve_model

    if config.backend == "ray_serve_llm":
        from rayalign.judge.serve_llm_judge import ServeLLMJudge

        return ServeLLMJudge(resolve_model(config.model), config, wait=wait)
    from rayalign.judge.vllm_judge import ServeJudge

    return ServeJudge(resolve_model(config.model), config, wait=wait)


HOSTED = ("vllm", "ray_serve_llm")
"""The judge backends that run the judge model on this job's Ray (and reserve its resources)."""


def components(config: RewardConfig) -> tuple[RewardComponent, ...]:
    """The reward's components; none configured means the judge alone."""
    return config.components or (RewardComponent(name="judge", kind="judge", weight=1.0),)


def build_reward(config: RewardConfig) -> CompositeReward:
    """The reward of a config; ``components`` empty means the judge alone. Nothing starts until the first call;
    a reward model that is missing or not a classifier, the judge's rubric that does not load and its API key
    variable that is not set raise here (ModelNotFoundError / ConfigError)."""
    from rayalign.judge.reward_model import RewardModelReward
    from rayalign.judge.rubric import RubricError, load_rubric, rubric_path

    judge = JudgeReward(config.judge)
    parts_wanted = components(config)
    if any(c.kind == "judge" for c in parts_wanted):  # what would otherwise fail only at the first step's judging
        try:
            load_rubric(rubric_path(config.judge.rubric))
        except RubricError as e:
            raise ConfigError(f"judge.rubric: {e}") from None
        key = config.judge.api_key_env
        if config.judge.backend == "openai" and key and not os.environ.get(key):
            raise ConfigError(f"judge.api_key_env names ${key}, which is not set")
    parts: list[tuple[str, float, Callable[..., list[Judgement]]]] = []
    for c in parts_wanted:
        if c.kind == "judge":
            parts.append((c.name, c.weight, judge))
        elif c.kind == "reward_model":
            parts.append((c.name, c.weight, RewardModelReward(c)))
        else:
            parts.append((c.name, c.weight, RuleReward(c.rule, config.judge)))
    return CompositeReward(parts)


def serves_judge(config: RewardConfig) -> bool:
    """Whether a judge component runs on Serve in this job (the vllm or ray_serve_llm backend) rather than behind
    an endpoint."""
    return config.judge.backend in HOSTED and any(c.kind == "judge" for c in components(config))


def uses_ray(config: RewardConfig) -> bool:
    """Whether the reward starts Ray actors (the Serve judge, reward models), i.e. needs Ray initialised."""
    return serves_judge(config) or any(c.kind == "reward_model" for c in components(config))
