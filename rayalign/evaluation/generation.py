"""Every evaluated model's answers to the same prompts: the base and every adapter on one LoRA engine group (one
engine start serves them all, each adapter loaded in turn as the next policy version, exactly as during
training), then each merged model on engines of its own. Engines are shut down before this returns, so the
judge that follows has the resources to itself.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Sequence

from rayalign.config import EngineConfig, HeldOutConfig, ModelConfig, SamplingConfig, lora_rank_slot
from rayalign.models import ResolvedModel
from rayalign.types import Rollout


def unique_labels(models: Sequence[ResolvedModel], taken: Sequence[str] = ("base",)) -> list[ResolvedModel]:
    """``models`` with labels safe in MLflow metric names and distinct from each other and from ``taken``."""
    seen, out = set(taken), []
    for m in models:
        label = re.sub(r"[^A-Za-z0-9_.-]+", "_", m.label) or "model"
        unique, k = label, 2
        while unique in seen:
            unique, k = f"{label}-{k}", k + 1
        seen.add(unique)
        out.append(dataclasses.replace(m, label=unique))
    return out


def generate_all(base: ResolvedModel, candidates: Sequence[ResolvedModel], prompts: Sequence[str],
                 model: ModelConfig, engine: EngineConfig, sampling: SamplingConfig,
                 ) -> tuple[dict[str, list[Rollout]], dict[str, float]]:
    """One rollout per prompt for ``base`` and every candidate: (rollouts by label, in prompt order; wall times
    as ``time/engine_start`` and ``time/generate/<label>``). Adapters are applied to ``base``."""
    from rayalign.rollout.group import RolloutGroup

    adapters = [c for c in candidates if c.kind == "adapter"]
    rollouts: dict[str, list[Rollout]] = {}
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    # a fixed model that takes each adapter in turn (`load_adapter`): LoRA is on only when there are adapters
    rank = lora_rank_slot(max(c.lora_rank for c in adapters)) if adapters else 0
    group = RolloutGroup(base.path, model, engine, max_lora_rank=rank, name="eval")
    times["time/engine_start"] = time.perf_counter() - t0
    try:
        for c in [base, *adapters]:
            t0 = time.perf_counter()
            if c.kind == "adapter":
                group.load_adapter(c.path)
            rollouts[c.label] = group.generate(prompts, sampling)
            times[f"time/generate/{c.label}"] = time.perf_counter() - t0
    finally:
        group.shutdown()
    for c in (c for c in candidates if c.kind == "merged"):
        t0 = time.perf_counter()
        group = RolloutGroup(c.path, dataclasses.replace(model, name=c.path), engine,
                             name="eval-merged")
        try:
            rollouts[c.label] = group.generate(prompts, sampling)
        finally:
            group.shutdown()
        times[f"time/generate/{c.label}"] = time.perf_counter() - t0
    return rollouts, times


def trained_model_summary(model: ModelConfig, engine: EngineConfig, held: HeldOutConfig, model_path: str,
                          merged_path: str, tracker: Any) -> str:
    """Greedy answers of the base (``model_path``) and a trained model (the merged HF directory ``merged_path``)
    to the held-out prompts, summarised side by side by the measures that need no judge
    (`rayalign.evaluation.report`), logged to ``tracker``; returns the terminal table and examples. The offline
    jobs end with it (jobs/ppo.py reports on the engines it already runs)."""
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    from rayalign.data.prompts import drop_overlong_prompts, load_prompts
    from rayalign.evaluation import report as R
    from rayalign.models import resolve_model_spec

    prompts = list(drop_overlong_prompts(load_prompts(held.prompts, limit=held.limit),
                                         AutoTokenizer.from_pretrained(model_path),
                                         engine.max_model_len - held.max_new_tokens).prompts)
    base = ResolvedModel("base", model_path, "base", model.name)
    with tempfile.TemporaryDirectory() as downloads:
        # the merged model on engines of its own: vLLM's CPU LoRA kernels decode several times slower than the base
        trained = resolve_model_spec(merged_path, Path(downloads), what="aligned")
        trained = dataclasses.replace(trained, label="aligned")
        rollouts, times = generate_all(base, [trained], prompts, model, engine, held.sampling)
    report = R.heldout_report(prompts, held, {label: R.answers(rs) for label, rs in rollouts.items()},
                              judgements=None, threshold=0.5)
    tracker.log_metrics({f"heldout/{k}": v for k, v in {**R.flat_metrics(report), **times}.items()}, step=0)
    tracker.log_dict(report, "heldout/report.json")
    return R.text_table(report) + "\n\n" + R.text_examples(report["samples"])
