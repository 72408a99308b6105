"""Generate training and held-out prompts from a list of topics, with vLLM on Ray Data.

Each of ``topics.per_topic`` requests per topic asks the LLM (the embedded SmolLM2 by default) for one customer
question as a small JSON object. Answers are parsed (code fences, text around the object, single quotes and
trailing commas repaired), too short / too long ones and exact or near duplicates (MinHash over word 3-grams)
dropped, as are those that duplicate the evaluation prompts (``filter.exclude``), and the rest split
train/holdout by a hash of their text. Every dropped row is counted by reason, on
stdout and in MLflow. Output: Parquet shards under ``output.dir`` (re-run to resume) and ``train.jsonl`` /
``holdout.jsonl``, ready as ``data.prompts`` of jobs/ppo.py.

    python jobs/generate_prompts.py output.dir=runs/prompts
    python jobs/generate_prompts.py output.dir=runs/prompts topics.per_topic=100 engine.num_engines=4
    ray job submit --working-dir . -- python jobs/generate_prompts.py output.dir=/mnt/data/prompts
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rayalign import config as C  # noqa: E402


@dataclasses.dataclass(frozen=True)
class TopicsConfig:
    file: str = "vegetarian"
    """A topics file shipped in jobs/topics/ (by name) or a path to one (system_prompt, request, topics)."""
    per_topic: int = 20
    """Requests per topic (each asks for one question)."""

    def validate(self) -> None:
        C.require_at_least("topics.per_topic", self.per_topic, 1)


@dataclasses.dataclass(frozen=True)
class QuestionFilter:
    min_words: int = 4
    """Questions with fewer words are dropped (too_short)."""
    max_words: int = 60
    """Questions with more words are dropped (too_long)."""
    near_duplicate_threshold: float = 0.6
    """Word 3-gram Jaccard similarity (MinHash estimate) at or above which a question duplicates an earlier one."""
    holdout_fraction: float = 0.15
    """Share of the questions put in the held-out split (by a hash of the text: stable across runs)."""
    split_seed: int = 0
    """Salt of the split hash."""
    exclude: str = "builtin:vegetarian/holdout"
    """Prompts that generated questions must not duplicate, exactly or nearly (dropped as in_excluded_set): the
    held-out set the models are evaluated on, so no training prompt leaks into it. Empty: none."""
    require_question_mark: bool = True
    """Drop texts without a "?" (not_a_question): a small model often writes a statement or a story instead."""

    def validate(self) -> None:
        if not 0 < self.near_duplicate_threshold <= 1:
            raise C.ConfigError(f"filter.near_duplicate_threshold: expected (0, 1], got {self.near_duplicate_threshold}")
        if not 0 <= self.holdout_fraction < 1:
            raise C.ConfigError(f"filter.holdout_fraction: expected [0, 1), got {self.holdout_fraction}")
        C.require_at_least("filter.min_words", self.min_words, 1)
        if self.max_words < self.min_words:
            raise C.ConfigError(f"filter.max_words ({self.max_words}) is below filter.min_words ({self.min_words})")


@dataclasses.dataclass(frozen=True)
class GeneratePromptsConfig:
    model: C.ModelConfig = C.ModelConfig()
    """The question-writing LLM."""
    engine: C.EngineConfig = C.EngineConfig()
    """vLLM engines (engine.num_engines = Ray Data's concurrency)."""
    sampling: C.SamplingConfig = C.SamplingConfig(temperature=0.9, max_new_tokens=80, seed=0, stop=('"}',))
    """How questions are sampled (sampling.seed: each request's seed derives from it and the request's index)."""
    topics: TopicsConfig = TopicsConfig()
    """What to ask for."""
    filter: QuestionFilter = QuestionFilter()
    """What to keep."""
    pipeline: C.PipelineConfig = C.PipelineConfig()
    """Ray Data batch and shard sizes."""
    output: C.OutputConfig = C.OutputConfig(dir="runs/prompts")
    """Where the shards go."""
    ray: C.RayConfig = C.RayConfig(num_cpus=4)
    """Which Ray."""
    tracking: C.TrackingConfig = C.TrackingConfig(experiment="rayalign-generate-prompts")
    """Where metrics go."""

    def phases(self) -> list:
        """What runs at once (`rayalign.placement`): the engine stage and up to 8 light Ray Data tasks."""
        from rayalign import placement as P

        from rayalign.data.pipelines import LIGHT_STAGE_CPUS

        return [P.Phase("pipeline", (*P.engines(self.engine), *P.cpu_tasks("light stage", 8, LIGHT_STAGE_CPUS)))]


SCHEMA_FIELDS = (("prompt", "string"), ("topic", "string"), ("split", "string"), ("request", "int64"))


def main(argv: list[str] | None = None) -> int:
    cfg = C.parse_job_config(GeneratePromptsConfig, argv, description=__doc__ or "")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from rayalign.data.topics import load_topics
    from rayalign.job import INPUT_ERRORS, refuse, start_ray
    from rayalign.models import resolve_base

    from rayalign.data.prompts import load_prompts

    try:
        topics = load_topics(cfg.topics.file)
        if cfg.filter.exclude:
            load_prompts(cfg.filter.exclude)  # a missing or empty file is refused now
        model_path = resolve_base(cfg.model.name)
    except INPUT_ERRORS as e:
        return refuse(e)

    import pyarrow as pa
    import ray

    from rayalign.data.cleaning import NearDuplicateIndex, holdout_split, length_problem, parse_json_field
    from rayalign.data.pipelines import (LIGHT_STAGE_CPUS, Generation, generated, row_seed, run_sharded,
                                         sampling_params, vllm_stage)
    from rayalign.data.shards import ShardedOutput
    from rayalign.tracking import Tracker

    total = len(topics.topics) * cfg.topics.per_topic
    num_shards = math.ceil(total / cfg.pipeline.shard_size)
    fingerprint = {"model": cfg.model.name, "topics": dataclasses.asdict(topics), "per_topic": cfg.topics.per_topic,
                   "sampling": dataclasses.asdict(cfg.sampling), "filter": dataclasses.asdict(cfg.filter),
                   "shard_size": cfg.pipeline.shard_size}
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in SCHEMA_FIELDS])
    try:
        out = ShardedOutput(cfg.output.dir, fingerprint, {"prompts": schema}, overwrite=cfg.output.overwrite)
        address = start_ray(cfg.ray, cfg.phases())
    except C.ConfigError as e:
        return refuse(e, "config error")
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # shards finish in order

    index = NearDuplicateIndex(cfg.filter.near_duplicate_threshold)
    excluded = NearDuplicateIndex(cfg.filter.near_duplicate_threshold)
    if cfg.filter.exclude:
        for text in load_prompts(cfg.filter.exclude).prompts:
            excluded.add(text)
    for row in out.rows("prompts"):  # a resumed run dedupes against what earlier runs kept
        index.check(row["prompt"])
    pending = [s for s in range(num_shards) if s not in out.done()]
    seed = cfg.sampling.seed or 0
    gen = Generation(model_path, cfg.model, cfg.engine, cfg.pipeline.batch_size, seed=seed)

    def requests(item: dict) -> list[dict]:
        shard = item["shard"]
        rows = []
        for request in range(shard * cfg.pipeline.shard_size, min(total, (shard + 1) * cfg.pipeline.shard_size)):
            topic, message = topics.request_for(request, cfg.topics.per_topic)
            rows.append({"shard": shard, "request": request, "topic": topic, "message": message})
        return rows

    def pre(row: dict) -> dict:
        messages = [{"role": "system", "content": topics.system_prompt}, {"role": "user", "content": row["message"]}]
        if topics.answer_prefix:  # continued by the model (the chat template stage sees a final assistant turn)
            messages.append({"role": "assistant", "content": topics.answer_prefix})
        return {**row, "messages": messages,
                "sampling_params": sampling_params(cfg.sampling,
                                                   row_seed(seed, row["request"]) if gen.row_seeds else None)}

    def post(row: dict) -> dict:
        text, tokens, error = generated(row)
        return {"shard": row["shard"], "request": row["request"], "topic": row["topic"],
                "text": topics.answer_prefix + text if text is not None else "",
                "tokens": tokens, "error": error}

    dropped: collections.Counter = out.totals("dropped")
    examples: list[dict] = []
    tokens_out = 0

    def finish(shard: int, rows: list[dict]) -> None:
        nonlocal tokens_out
        kept, reasons = [], collections.Counter()
        for row in sorted(rows, key=lambda r: r["request"]):
            tokens_out += row["tokens"]
            question, reason = (None, "generation_failed") if row["error"] else parse_json_field(row["text"],
                                                                                                 "question")
            reason = reason or length_problem(question or "", cfg.filter.min_words, cfg.filter.max_words)
            if not reason and cfg.filter.require_question_mark and "?" not in (question or ""):
                reason = "not_a_question"
            if not reason and excluded.find(question or ""):
                reason = "in_excluded_set"
            reason = reason or index.check(question or "")
            if reason:
                reasons[reason] += 1
                if len(examples) < 12:
                    examples.append({"reason": reason, "raw": row["text"][:300]})
                continue
            kept.append({"prompt": question, "topic": row["topic"], "request": row["request"],
                         "split": holdout_split(question or "", cfg.filter.holdout_fraction, cfg.filter.split_seed)})
        out.write(shard, {"prompts": kept}, {"requests": len(rows), "kept": len(kept), "dropped": dict(reasons)})
        dropped.update(reasons)

    with Tracker(cfg.tracking.experiment, run_name=cfg.tracking.run_name, config=cfg,
                 tags={"job": "generate_prompts", "ray_address": address}) as tracker:
        print(f"{total} requests ({len(topics.topics)} topics x {cfg.topics.per_topic}) in {num_shards} shards; "
              f"{num_shards - len(pending)} already written in {out.root}; generating the rest with "
              f"{cfg.engine.num_engines} vLLM engine(s) on Ray Data (the engines take a minute to start)", flush=True)
        started = time.perf_counter()
        if pending:
            ds = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=len(pending))
            ds = vllm_stage(gen, pre, post)(
                ds.flat_map(requests, num_cpus=LIGHT_STAGE_CPUS))
            expected = {s: len(requests({"shard": s})) for s in pending}
            run_sharded(ds, expected, finish, progress=lambda done, n: print(
                f"shard {done}/{n} written ({time.perf_counter() - started:.0f} s)", flush=True))
        seconds = time.perf_counter() - started

        counts = collections.Counter()
        paths = {split: out.root / f"{split}.jsonl" for split in ("train", "holdout")}
        files = {split: open(path, "w", encoding="utf-8") for split, path in paths.items()}
        try:
            for row in out.rows("prompts"):
                counts[row["split"]] += 1
                files[row["split"]].write(json.dumps({"prompt": row["prompt"], "topic": row["topic"]}) + "\n")
        finally:
            for f in files.values():
                f.close()
        kept = sum(counts.values())
        if not kept:
            print(f"error: no question survived the filters (dropped: {dict(dropped)}); see "
                  f"dropped_examples.json in MLflow run {tracker.run_id}", file=sys.stderr)
            tracker.end("FAILED")
            ray.shutdown()
            return 1
        metrics = {"requests": total, "kept": kept, "train": counts["train"], "holdout": counts["holdout"],
                   "seconds": seconds, **{f"dropped/{k}": v for k, v in dropped.items()}}
        if pending and seconds > 0:
            metrics["output_tokens_per_second"] = tokens_out / seconds
        tracker.log_metrics(metrics, step=0)
        tracker.log_dict({"dropped": dict(dropped), "kept": kept, "splits": dict(counts)}, "counts.json")
        if examples:
            tracker.log_table(examples, "dropped_examples.json")
        for path in paths.values():
            tracker.log_artifact(path)
        drops = ", ".join(f"{k} {v}" for k, v in dropped.most_common()) or "none"
        print(f"{kept} questions kept of {total} requests (train {counts['train']}, holdout {counts['holdout']}); "
              f"dropped: {drops}.\nWrote {paths['train']} and {paths['holdout']} in {seconds:.0f} s. "
              f"MLflow run {tracker.run_id}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
