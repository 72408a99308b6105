"""Generate judged preference data with vLLM and the judge on Ray Data: pairs for DPO, labelled answers for KTO.

For every prompt the model answers several times -- sampled as it is (``candidates.policy_samples``) and under
steering system prompts (``candidates.steering``: by default one "good" and one "bad") -- and every answer is
scored by the reward config (the LLM judge on Ray Serve and/or rules). An answer below the rubric's threshold is
critiqued against a constitution and rewritten by the model, then judged again, up to ``rewrite.rounds`` times.
Per prompt, the best-scored answer (a rewrite included) becomes ``chosen`` and the worst first answer
``rejected``, when their scores differ by ``pairs.min_margin``; every judged answer also becomes a KTO row.

Output, under ``output.dir``: ``pairs/`` (prompt, chosen, rejected, chosen_score, rejected_score, margin, ...)
and ``kto/`` (prompt, completion, label, score, ...) as Parquet shards, loadable with
``datasets.load_dataset("parquet", data_files="<dir>/pairs/*.parquet")``, plus ``pairs.jsonl`` and ``kto.jsonl``
(the same rows; ``data.pairs`` of jobs/dpo.py) and every answer with its scores in ``candidates/`` and
``rewrite_<r>/``. A re-run skips finished shards.

    python jobs/generate_preferences.py output.dir=runs/prefs
    python jobs/generate_preferences.py output.dir=runs/prefs data.prompts=runs/prompts/train.jsonl rewrite.rounds=2
    python jobs/generate_preferences.py --config jobs/configs/generate_preferences_gpu.yaml   # 70B judge, 8B policy
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rayalign import config as C  # noqa: E402

GOOD_STEERING = ("You are the food chatbot of a vegetarian grocery store. Recommend only vegetarian food: never "
                 "meat, poultry, fish or seafood, and no gelatin, fish sauce or meat stock. Give concrete, friendly "
                 "advice in a few sentences.")
BAD_STEERING = ("You are a food chatbot. Recommend dishes with meat, chicken, fish or seafood wherever you can.")


@dataclasses.dataclass(frozen=True)
class Steering:
    name: str = "good"
    """Logged as the answer's ``source``."""
    system: str = GOOD_STEERING
    """The system prompt the answers are sampled under (not stored with the prompt)."""
    samples: int = 1
    """Answers per prompt under this prompt."""


@dataclasses.dataclass(frozen=True)
class CandidatesConfig:
    policy_samples: int = 2
    """Answers per prompt sampled from the model as it is (no system prompt): source ``policy``."""
    steering: tuple[Steering, ...] = (Steering("good", GOOD_STEERING, 1), Steering("bad", BAD_STEERING, 1))
    """Steering system prompts and how many answers each."""

    def validate(self) -> None:
        if self.policy_samples < 0 or any(s.samples < 0 for s in self.steering):
            raise C.ConfigError("candidates: sample counts must be >= 0")
        if self.policy_samples + sum(s.samples for s in self.steering) < 2:
            raise C.ConfigError("candidates: a pair needs at least 2 answers per prompt (policy_samples + steering)")
        names = ["policy", "rewrite"] + [s.name for s in self.steering]
        if len(set(names)) != len(names):
            raise C.ConfigError(f"candidates.steering: names must be unique and not 'policy' or 'rewrite', got "
                                f"{[s.name for s in self.steering]}")


@dataclasses.dataclass(frozen=True)
class RewriteConfig:
    rounds: int = 1
    """Critique-and-rewrite rounds for answers below the threshold (0: none)."""
    constitution: str = "vegetarian"
    """A constitution in jobs/constitutions/ (by name) or a YAML path: the principles the critique checks."""
    threshold: float | None = None
    """Score below which an answer is rewritten, and the KTO label's cut (None: the rubric's threshold)."""
    critique_tokens: int = 96
    """Most tokens of a critique."""
    temperature: float = 0.7
    """Sampling temperature of critiques and rewrites."""

    def validate(self) -> None:
        C.require_at_least("rewrite.rounds", self.rounds, 0)
        C.require_at_least("rewrite.critique_tokens", self.critique_tokens, 1)
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise C.ConfigError(f"rewrite.threshold: expected a float in (0, 1) or null, got {self.threshold}")


@dataclasses.dataclass(frozen=True)
class PairsConfig:
    min_margin: float = 0.2
    """Smallest score difference (chosen - rejected) that makes a pair."""

    def validate(self) -> None:
        if not 0 <= self.min_margin < 1:
            raise C.ConfigError(f"pairs.min_margin: expected a float in [0, 1), got {self.min_margin}")


@dataclasses.dataclass(frozen=True)
class GeneratePreferencesConfig:
    model: C.ModelConfig = C.ModelConfig()
    """The model that answers, critiques and rewrites (the policy to align, for on-policy pairs)."""
    engine: C.EngineConfig = C.EngineConfig()
    """vLLM engines of each generation stage (engine.num_engines = Ray Data's concurrency)."""
    sampling: C.SamplingConfig = C.SamplingConfig(temperature=0.8, max_new_tokens=128)
    """How answers and rewrites are sampled."""
    data: C.DataConfig = C.DataConfig(prompts="builtin:vegetarian/train")
    """The prompts (a ``prompt`` field per row)."""
    candidates: CandidatesConfig = CandidatesConfig()
    """Which answers each prompt gets."""
    reward: C.RewardConfig = C.CPU_DEFAULT_REWARD
    """How answers are scored (the same sections as jobs/ppo.py's reward)."""
    rewrite: RewriteConfig = RewriteConfig()
    """Critique-and-rewrite of weak answers."""
    pairs: PairsConfig = PairsConfig()
    """Which pairs are kept."""
    pipeline: C.PipelineConfig = C.PipelineConfig()
    """Ray Data batch and shard sizes (shard_size counts input prompts)."""
    output: C.OutputConfig = C.OutputConfig(dir="runs/preferences")
    """Where the shards go."""
    ray: C.RayConfig = C.RayConfig(num_cpus=6)
    """Which Ray (logical CPUs: the engines, the judge and the light stages take turns on the cores)."""
    tracking: C.TrackingConfig = C.TrackingConfig(experiment="rayalign-generate-preferences")
    """Where metrics go."""

    def phases(self) -> list:
        """What runs at once (`rayalign.placement`): the generation stages' engines (a rewrite round runs a
        critique and a rewrite stage beside the answers), the reward's actors and up to 16 light Ray Data tasks."""
        from rayalign import placement as P
        from rayalign.data.pipelines import LIGHT_STAGE_CPUS

        stages = 2 if self.rewrite.rounds else 1
        engines = P.engines(dataclasses.replace(self.engine, num_engines=stages * self.engine.num_engines))
        return [P.Phase("pipeline", (*engines, *P.reward(self.reward), *P.cpu_tasks("light stage", 16, LIGHT_STAGE_CPUS)))]

    def validate(self) -> None:
        if self.reward.judge.backend == "ray_serve_llm":
            raise C.ConfigError("reward.judge.backend=ray_serve_llm: the pipeline's Ray Data stage calls rayalign's "
                                "judge deployment (vllm) or an endpoint (openai); use one of those")


ANSWER_FIELDS = (("prompt_id", "int64"), ("prompt", "string"), ("source", "string"), ("round", "int64"),
                 ("response", "string"), ("tokens", "int64"), ("score", "float64"), ("reward", "float64"),
                 ("error", "string"), ("components", "string"), ("critique", "string"), ("parent", "string"),
                 ("key", "string"))
PAIR_FIELDS = (("prompt", "string"), ("chosen", "string"), ("rejected", "string"), ("chosen_score", "float64"),
               ("rejected_score", "float64"), ("margin", "float64"), ("chosen_source", "string"),
               ("rejected_source", "string"), ("prompt_id", "int64"))
KTO_FIELDS = (("prompt", "string"), ("completion", "string"), ("label", "bool"), ("score", "float64"),
              ("source", "string"), ("prompt_id", "int64"))


def schema(fields):
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, "bool_" if kind == "bool" else kind)()) for name, kind in fields])


# ray.data.llm's chat template stage writes the templated text to a ``prompt`` column: through a vLLM stage the
# user's prompt travels as ``user_prompt`` and comes back as ``prompt`` in the stage's postprocess.


def main(argv: list[str] | None = None) -> int:
    cfg = C.parse_job_config(GeneratePreferencesConfig, argv, description=__doc__ or "")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from rayalign.data.prompts import plan_input_shards, read_input_shard
    from rayalign.job import INPUT_ERRORS, refuse, start_ray
    from rayalign.judge.critique import constitution_path, critique_messages, load_constitution, rewrite_messages
    from rayalign.judge.reward import build_reward
    from rayalign.judge.rubric import load_rubric, rubric_path
    from rayalign.models import resolve_base

    try:
        build_reward(cfg.reward)  # refuses a bad reward config now; starts nothing
        for c in cfg.reward.components:
            if c.kind == "reward_model":
                raise C.ConfigError(f"reward component '{c.name}': kind=reward_model is not supported by "
                                    f"generate_preferences yet (use a judge and/or rules)")
        constitution = load_constitution(constitution_path(cfg.rewrite.constitution))
        threshold = (cfg.rewrite.threshold if cfg.rewrite.threshold is not None
                     else load_rubric(rubric_path(cfg.reward.judge.rubric)).threshold)
        input_path, shards = plan_input_shards(cfg.data.prompts, cfg.pipeline.shard_size, limit=cfg.data.limit)
        model_path = resolve_base(cfg.model.name)
    except INPUT_ERRORS as e:
        return refuse(e)

    import ray

    from rayalign.data.pairing import build_preferences, needs_rewrite
    from rayalign.data.pipelines import (LIGHT_STAGE_CPUS, Generation, finite_or_none, generated, reward_stage,
                                         row_seed, run_sharded, sampling_params, vllm_stage)
    from rayalign.data.shards import ShardedOutput
    from rayalign.tracking import Tracker

    samples = [("policy", "", cfg.candidates.policy_samples)] + [(s.name, s.system, s.samples)
                                                                 for s in cfg.candidates.steering]
    fingerprint = {"model": cfg.model.name, "prompts": str(input_path), "limit": cfg.data.limit,
                   "sampling": dataclasses.asdict(cfg.sampling), "candidates": dataclasses.asdict(cfg.candidates),
                   "reward": C.to_dict(cfg.reward), "shard_size": cfg.pipeline.shard_size}
    root = Path(cfg.output.dir).expanduser()
    rounds_fp = [dict(fingerprint)]
    for r in range(1, cfg.rewrite.rounds + 1):
        rounds_fp.append({**rounds_fp[-1], f"rewrite_{r}": {"constitution": dataclasses.asdict(constitution),
                                                             "threshold": threshold,
                                                             "rewrite": dataclasses.asdict(cfg.rewrite)}})
    final_fp = {**rounds_fp[-1], "rounds": cfg.rewrite.rounds, "min_margin": cfg.pairs.min_margin,
                "threshold": threshold}
    try:
        stages = [ShardedOutput(root / "candidates", rounds_fp[0], {"answers": schema(ANSWER_FIELDS)},
                                overwrite=cfg.output.overwrite)]
        stages += [ShardedOutput(root / f"rewrite_{r}", rounds_fp[r], {"answers": schema(ANSWER_FIELDS)},
                                 overwrite=cfg.output.overwrite) for r in range(1, cfg.rewrite.rounds + 1)]
        final = ShardedOutput(root, final_fp, {"pairs": schema(PAIR_FIELDS), "kto": schema(KTO_FIELDS)},
                              overwrite=cfg.output.overwrite)
        address = start_ray(cfg.ray, cfg.phases())
    except C.ConfigError as e:
        return refuse(e, "config error")
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # shards finish in order

    seed = cfg.sampling.seed or 0
    gen = Generation(model_path, cfg.model, cfg.engine, cfg.pipeline.batch_size, seed=seed)
    by_index = {s.index: s for s in shards}
    counts: collections.Counter = collections.Counter()
    for s in shards:
        counts.update({f"input/{k}": v for k, v in s.skipped.items()})
    tokens_out = collections.Counter()

    def answer_rows(item: dict) -> list[dict]:
        shard = by_index[item["shard"]]
        rows = []
        for prompt_id, prompt in read_input_shard(input_path, shard):
            for source, system, n in samples:
                for k in range(n):
                    rows.append({"shard": shard.index, "prompt_id": prompt_id, "prompt": prompt, "source": source,
                                 "key": f"{prompt_id}:{source}:{k}", "system": system})
        return rows

    def answer_pre(row: dict) -> dict:
        messages = ([{"role": "system", "content": row["system"]}] if row["system"] else []) + [
            {"role": "user", "content": row["prompt"]}]
        return {**row, "user_prompt": row["prompt"], "messages": messages,
                "sampling_params": sampling_params(cfg.sampling, row_seed(seed, row["key"]) if gen.row_seeds
                                                   else None)}

    def answer_post(row: dict) -> dict:
        text, tokens, error = generated(row)
        return {"shard": row["shard"], "prompt_id": row["prompt_id"], "prompt": row["user_prompt"],
                "source": row["source"], "key": row["key"], "round": 0, "parent": "", "critique": "",
                "response": text or "", "tokens": tokens, "gen_error": error}

    def to_answer(row: dict) -> dict:
        error = row["gen_error"] or row["reward_error"]
        if not error and finite_or_none(row["score"]) is None:
            error = "no score"  # never a judged answer without a number
        return {"prompt_id": row["prompt_id"], "prompt": row["prompt"], "source": row["source"],
                "round": row["round"], "response": row["response"], "tokens": row["tokens"],
                "score": None if error else row["score"], "reward": None if error else row["reward"],
                "error": error, "components": row["components"], "critique": row["critique"],
                "parent": row["parent"], "key": row["key"]}

    def writer(stage: ShardedOutput, name: str):
        def finish(shard: int, rows: list[dict]) -> None:
            answers = sorted((to_answer(r) for r in rows), key=lambda a: (a["prompt_id"], a["key"]))
            tokens_out[name] += sum(a["tokens"] for a in answers)
            stage.write(shard, {"answers": answers}, {"answers": len(answers)})
        return finish

    def to_rewrite(r: int):
        """Round r's inputs in shard s: the latest version of every answer still below the threshold."""
        def rows_of(shard: int) -> list[dict]:
            previous = list(stages[r - 1].rows("answers", [shard]))
            return [a for a in previous if needs_rewrite(a, threshold)]
        return rows_of

    def critique_pre(row: dict) -> dict:
        return {**row, "user_prompt": row["prompt"],
                "messages": critique_messages(constitution, row["prompt"], row["response"]),
                "sampling_params": sampling_params(cfg.sampling, None, temperature=cfg.rewrite.temperature,
                                                   max_tokens=cfg.rewrite.critique_tokens)}

    def critique_post(row: dict) -> dict:
        text, tokens, error = generated(row)
        keep = {k: row[k] for k in ("shard", "prompt_id", "user_prompt", "response", "key", "round")}
        return {**keep, "critique": text or "", "critique_error": error, "critique_tokens": tokens}

    def rewrite_pre(row: dict) -> dict:
        return {**row, "messages": rewrite_messages(constitution, row["user_prompt"], row["response"],
                                                    row["critique"]),
                "sampling_params": sampling_params(cfg.sampling, None, temperature=cfg.rewrite.temperature)}

    def rewrite_post(row: dict) -> dict:
        text, tokens, error = generated(row)
        return {"shard": row["shard"], "prompt_id": row["prompt_id"], "prompt": row["user_prompt"], "source": "rewrite",
                "key": f"{row['key']}/r{row['round'] + 1}", "parent": row["key"], "round": row["round"] + 1,
                "critique": row["critique"], "response": text or "", "tokens": tokens + row["critique_tokens"],
                "gen_error": row["critique_error"] or error}

    judge = None
    with Tracker(cfg.tracking.experiment, run_name=cfg.tracking.run_name, config=cfg,
                 tags={"job": "generate_preferences", "ray_address": address}) as tracker:
        started = time.perf_counter()
        num_prompts = sum(s.prompts for s in shards)
        per_prompt = sum(n for _, _, n in samples)
        print(f"{num_prompts} prompts x {per_prompt} answers in {len(shards)} shards -> {root}; "
              f"{cfg.rewrite.rounds} critique-and-rewrite round(s) below score {threshold:g}", flush=True)
        try:
            if any(c.kind == "judge" for c in (cfg.reward.components or (C.RewardComponent(),))) \
                    and cfg.reward.judge.backend == "vllm" and any(
                    s.index not in stage.done() for stage in stages for s in shards):
                from rayalign.judge.vllm_judge import ServeJudge
                from rayalign.models import resolve_model

                print("starting the judge on Ray Serve (about a minute on CPU)", flush=True)
                judge = ServeJudge(resolve_model(cfg.reward.judge.model), cfg.reward.judge)
            for r, stage in enumerate(stages):
                pending = [s.index for s in shards if s.index not in stage.done()]
                name = "answers" if r == 0 else f"rewrite_{r}"
                if not pending:
                    print(f"{name}: every shard already written", flush=True)
                    continue
                ds = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=len(pending))
                if r == 0:
                    expected = {s: by_index[s].prompts * per_prompt for s in pending}
                    ds = vllm_stage(gen, answer_pre, answer_post)(ds.flat_map(answer_rows, num_cpus=LIGHT_STAGE_CPUS))
                else:
                    rows_of = to_rewrite(r)
                    expected = {s: len(rows_of(s)) for s in pending}
                    ds = ds.flat_map(lambda item, rows_of=rows_of: [{**a, "shard": item["shard"]}
                                                                    for a in rows_of(item["shard"])],
                                     num_cpus=LIGHT_STAGE_CPUS)
                    ds = vllm_stage(gen, rewrite_pre, rewrite_post)(vllm_stage(gen, critique_pre, critique_post)(ds))
                print(f"{name}: {sum(expected.values())} to generate and judge in {len(pending)} shards", flush=True)
                judged = reward_stage(cfg.reward, judge_app=judge.app_name if judge else None,
                                      batch_size=cfg.pipeline.batch_size,
                                      judge_timeout_s=cfg.pipeline.judge_timeout_s)
                run_sharded(judged(ds), expected, writer(stage, name), progress=lambda done, n, name=name: print(
                    f"{name}: shard {done}/{n} written ({time.perf_counter() - started:.0f} s)", flush=True))
        finally:
            if judge is not None:
                judge.shutdown()
        seconds = time.perf_counter() - started

        for s in shards:  # pairs and KTO rows, one shard in memory at a time
            if s.index in final.done():
                continue
            answers = [a for stage in stages for a in stage.rows("answers", [s.index])]
            pairs, kto, shard_counts = build_preferences(answers, threshold, cfg.pairs.min_margin)
            stats = {"prompts": s.prompts, "answers": len(answers), "pairs": len(pairs), "kto": len(kto),
                     "counts": dict(shard_counts)}
            final.write(s.index, {"pairs": pairs, "kto": kto}, stats)
        counts.update(final.totals("counts"))
        for table, columns in (("pairs", ("prompt", "chosen", "rejected", "chosen_score", "rejected_score")),
                               ("kto", ("prompt", "completion", "label", "score"))):
            with open(root / f"{table}.jsonl", "w", encoding="utf-8") as f:  # the same rows, one JSON per line
                for row in final.rows(table):
                    f.write(json.dumps({k: row[k] for k in columns}) + "\n")
        totals = {key: sum(stats[key] for stats in final.shards.values()) for key in ("prompts", "answers", "pairs",
                                                                                       "kto")}
        rewrites = sum(1 for stage in stages[1:] for _ in stage.rows("answers"))
        metrics = {**totals, "rewrites": rewrites, "seconds": seconds,
                   **{f"dropped/{k}": v for k, v in counts.items()}}
        if seconds > 0 and sum(tokens_out.values()):
            metrics["output_tokens_per_second"] = sum(tokens_out.values()) / seconds
        tracker.log_metrics(metrics, step=0)
        tracker.log_dict({"counts": dict(counts), **totals, "rewrites": rewrites}, "counts.json")
        tracker.log_table(list(final.rows("pairs"))[:50], "pairs_sample.json")
        drops = ", ".join(f"{k} {v}" for k, v in counts.most_common() if k != "rewrite_chosen") or "none"
        print(f"{totals['pairs']} pairs and {totals['kto']} KTO rows from {totals['prompts']} prompts "
              f"({totals['answers']} answers, {rewrites} rewrites, {counts['rewrite_chosen']} rewrites chosen); "
              f"left out: {drops}.\nWrote {root / 'pairs.jsonl'} and {root / 'kto.jsonl'} (and Parquet shards) in "
              f"{seconds:.0f} s. "
              f"MLflow run {tracker.run_id}", flush=True)
        if not totals["pairs"]:
            print("error: no pair was made (see the counts above)", file=sys.stderr)
            tracker.end("FAILED")
            ray.shutdown()
            return 1
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
