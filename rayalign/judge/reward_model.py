"""Reward-model components: a sequence classifier scores (prompt, response) pairs in its own Ray actor.

The classic RLHF reward (InstructGPT; what TRL's `RewardTrainer` produces): a language model with a scalar head
that reads the whole conversation. Its output already is a reward, unbounded, so no logit transform is applied:
one output label gives that logit, two give ``logit[1] - logit[0]`` (the log-odds of "good"). The ``score``
(shown in sample tables, averaged in composites) is ``sigmoid(reward)``, in [0, 1].

A pair longer than ``max_length`` tokens or a non-finite output is a failed judgement (``None``, dropped and
counted by the caller), never a 0 and never silently truncated. A directory that holds a causal LM rather than
a classifier is refused when the reward is built: transformers would otherwise bolt a random head onto it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from rayalign.config import ConfigError, RewardComponent
from rayalign.types import Judgement


def check_classifier(path: str, config: dict[str, Any] | None = None) -> None:
    """Raise ConfigError unless ``config`` (default: the HF directory ``path``'s config.json) describes a sequence
    classifier with 1 or 2 labels. Hub ids have no local config; the actor checks those when it loads them."""
    if config is None:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            return
        try:
            config = json.loads(config_file.read_text())
        except ValueError as e:
            raise ConfigError(f"reward model {path}: config.json is not valid JSON ({e})") from e
    archs = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(f"reward model {path} is not a sequence classifier (architectures: {archs or 'none'}); "
                          "a reward_model component needs an AutoModelForSequenceClassification checkpoint")
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if labels not in (1, 2):
        raise ConfigError(f"reward model {path} has {labels} labels; expected 1 (a scalar reward) or 2 (bad/good)")


def conversation_ids(tokenizer: Any, prompt: Sequence[tuple[str, str]], response: str) -> list[int]:
    """The tokens a reward model reads for ``response`` to the conversation ``prompt`` ((role, content), ...): the
    whole chat-templated conversation, or, for a tokenizer without a chat template, the last message and the
    response as a text pair. jobs/train_reward_model.py trains on exactly these."""
    if tokenizer.chat_template:
        messages = [{"role": role, "content": content} for role, content in prompt]
        return list(tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}],
                                                  tokenize=True, return_dict=True)["input_ids"])
    return tokenizer(prompt[-1][1], response)["input_ids"]


class RewardModelScorer:
    """The actor body: tokenizer + classifier, scoring in batches without gradients."""

    def __init__(self, path: str, batch_size: int, max_length: int, use_gpu: bool, threads: int | None = None):
        import os

        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        if not use_gpu:  # Ray's OMP_NUM_THREADS is the actor's reserved CPUs (1); scoring has the cores to itself
            torch.set_num_threads(threads or os.cpu_count() or 1)

        check_classifier(path, AutoConfig.from_pretrained(path).to_dict())  # hub ids are first seen here
        self.device = "cuda" if use_gpu else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        dtype = torch.bfloat16 if use_gpu else torch.float32
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).to(self.device).eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # the head pools the last non-pad token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.labels = self.model.config.num_labels
        self.batch_size, self.max_length = batch_size, max_length

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[tuple[float | None, str]]:
        """(reward, "") per pair, or (None, why) for a pair that cannot be scored."""
        import torch

        ids = [conversation_ids(self.tokenizer, (("user", p),), r) for p, r in zip(prompts, responses, strict=True)]
        out: list[tuple[float | None, str]] = [(None, "")] * len(ids)
        fits = []
        for i, seq in enumerate(ids):
            if len(seq) > self.max_length:
                out[i] = (None, f"{len(seq)} tokens, over the reward model's max_length {self.max_length}")
            else:
                fits.append(i)
        for start in range(0, len(fits), self.batch_size):
            rows = fits[start:start + self.batch_size]
            batch = self.tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
            with torch.no_grad():
                logits = self.model(input_ids=batch["input_ids"].to(self.device),
                                    attention_mask=batch["attention_mask"].to(self.device)).logits.float().cpu()
            values = logits[:, 0] if self.labels == 1 else logits[:, 1] - logits[:, 0]
            for i, v in zip(rows, values.tolist()):
                out[i] = (v, "") if math.isfinite(v) else (None, f"non-finite reward-model output {v}")
        return out


class RewardModelReward:
    """A reward_model component: the actor is started on first use (so building a reward starts nothing)."""

    def __init__(self, component: RewardComponent):
        from rayalign.models import resolve_model

        self.component = component
        self.path = resolve_model(component.model)
        check_classifier(self.path)
        self.actor: Any = None

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Judgement]:
        import ray

        from rayalign.resources import worker_env

        c = self.component
        if self.actor is None:
            self.actor = ray.remote(RewardModelScorer).options(
                num_cpus=c.num_cpus, num_gpus=c.num_gpus, max_restarts=1, max_task_retries=1,
                runtime_env={"env_vars": worker_env()},
            ).remote(self.path, c.batch_size, c.max_length, c.num_gpus > 0, c.torch_threads)
        try:
            scored = ray.get(self.actor.score.remote(list(prompts), list(responses)), timeout=c.timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            # the actor failed to load, died twice or hangs: as for a dead judge endpoint, the job stops cleanly
            from rayalign.judge.openai_judge import JudgeUnavailableError

            raise JudgeUnavailableError(f"reward model '{c.name}' ({self.path}) is unavailable: "
                                        f"{str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}",
                                        [None] * len(prompts)) from e
        return [Judgement(0.5 * (1.0 + math.tanh(r / 2)), r, raw=f"{r:.4f}") if r is not None
                else Judgement(None, None, error=why) for r, why in scored]

    def shutdown(self) -> None:
        if self.actor is not None:
            import ray

            ray.kill(self.actor, no_restart=True)
            self.actor = None
