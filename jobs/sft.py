"""Supervised fine-tuning (distilled SFT, as in Zephyr) on (prompt, response) rows, on the same learner as
jobs/ppo.py and jobs/dpo.py.

Reads prompt/response rows (plain or conversational: TRL's prompt/completion, a `messages` conversation, or the
chosen side of preference pairs), tokenizes them with the policy's chat template, skips and counts the rows it
cannot use, and holds out an eval split. The loss is the mean negative log-likelihood of the response tokens
alone (`rayalign.learner.objectives.sft_objective`). Examples are packed several to a row of ``data.max_length``
tokens (best-fit decreasing, once, so a resumed run packs the same rows), each keeping its own positions and
attending only to itself (`rayalign.learner.packing`), so no compute goes to padding. Each step trains on the
next ``algorithm.minibatch_size`` rows of a seeded per-epoch shuffle. The learner is Ray Train + DeepSpeed
(ZeRO 0-3), LoRA or full. Metrics (loss, tokens/s, eval loss and perplexity), checkpoints (exact resume) and the
final adapter and merged model go where jobs/ppo.py puts them; the merged model is a plain HF directory, the
`model.name` of a following jobs/ppo.py or jobs/dpo.py. It ends, by default, with the held-out summary: base and
SFT answers to the held-out prompts, greedy, side by side.

    python jobs/sft.py                                            # the shipped pipeline pairs' chosen answers
    python jobs/sft.py data.train=teacher.jsonl data.response_column=completion trainer.total_steps=200
    python jobs/sft.py data.packing=false learner.micro_batch_size=4 algorithm.minibatch_size=8
    python jobs/sft.py trainer.resume=true                        # continue the latest run from its last checkpoint
    python jobs/dpo.py model.name=outputs/<sft run>/merged        # then DPO (or jobs/ppo.py) from the SFT model
    python jobs/sft.py --config jobs/configs/sft_gpu.yaml         # an 8B policy on 4 learner GPUs
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rayalign import config as C  # noqa: E402

log = logging.getLogger("rayalign.sft")


@dataclasses.dataclass(frozen=True)
class SFTJobConfig:
    model: C.ModelConfig = C.ModelConfig()
    """The model to fine-tune."""
    algorithm: C.SFTConfig = C.SFTConfig()
    """Epochs and rows per optimizer step."""
    learner: C.LearnerConfig = C.LearnerConfig(lr=2e-4, micro_batch_size=1)
    """Ray Train + DeepSpeed learner (micro_batch_size counts rows: packed rows under data.packing)."""
    lora: C.LoraConfig = C.LoraConfig()
    """The adapter (learner.finetune=lora)."""
    data: C.SFTDataConfig = C.SFTDataConfig()
    """Which rows, how they are packed."""
    trainer: C.OfflineTrainerConfig = C.OfflineTrainerConfig()
    """Steps, evaluation, checkpoints, resume, outputs."""
    heldout: C.HeldOutConfig = C.HeldOutConfig()
    """The held-out summary at the end."""
    engine: C.EngineConfig = C.EngineConfig()
    """vLLM engines for the held-out answers."""
    ray: C.RayConfig = C.RayConfig(num_cpus=4)
    """Which Ray. The learner and the held-out engines take turns, so the local default's 4 logical CPUs may
    exceed the cores."""
    tracking: C.TrackingConfig = C.TrackingConfig(experiment="rayalign-sft")
    """Where results go."""

    def phases(self) -> list:
        """What runs at once (`rayalign.placement`)."""
        from rayalign import placement as P

        return P.offline_phases(self.learner, self.engine if self.heldout.enabled else None)

    def validate(self) -> None:
        per_step = self.learner.micro_batch_size * self.learner.num_workers
        if self.algorithm.minibatch_size % per_step:
            raise C.ConfigError(f"algorithm.minibatch_size ({self.algorithm.minibatch_size}) must be a multiple of "
                                f"learner.micro_batch_size x learner.num_workers ({per_step})")
        if self.data.max_length > self.engine.max_model_len and self.heldout.enabled:
            raise C.ConfigError(f"data.max_length ({self.data.max_length}) is over engine.max_model_len "
                                f"({self.engine.max_model_len}): the model would train on lengths it never serves")


def main(argv: list[str] | None = None) -> int:
    cfg = C.parse_job_config(SFTJobConfig, argv, description=__doc__ or "")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from rayalign.data import preferences as P
    from rayalign.job import INPUT_ERRORS, load_job_inputs, refuse, start_ray
    from rayalign.learner.checkpoints import resolve_run

    algo, trainer, data = cfg.algorithm, cfg.trainer, cfg.data
    try:
        model_path = load_job_inputs(cfg.model.name, None, None).model_path
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        train, evals = P.load_split(lambda name, limit: P.load_sft(name, column=data.response_column, limit=limit),
                                    data, trainer.seed)
        train, train_rows = P.drop_overlong(train, P.tokenize(train.examples, tokenizer), data.max_length)
        eval_rows = P.tokenize(evals.examples, tokenizer) if evals.examples else []
        if eval_rows:
            evals, eval_rows = P.drop_overlong(evals, eval_rows, data.max_length)
        storage, run_name, resume_from, fork = resolve_run(trainer, prefix="sft")
    except INPUT_ERRORS as e:
        return refuse(e)
    train_rows = [ex[0] for ex in train_rows]
    eval_rows = [ex[0] for ex in eval_rows]
    skipped = {**train.skipped, **{f"eval: {k}": v for k, v in evals.skipped.items()}}

    import ray
    import torch

    from rayalign.evaluation.generation import trained_model_summary
    from rayalign.learner import offline
    from rayalign.learner.batch import minibatch_plan
    from rayalign.learner.packing import pack, packed_batch

    def rows_of(examples: list) -> list[list[int]]:
        """Each training row's examples: packed to data.max_length tokens, or one per row."""
        if not data.packing:
            return [[i] for i in range(len(examples))]
        return pack([len(r.prompt_token_ids) + len(r.response_token_ids) for r in examples], data.max_length)

    train_packs, eval_packs = rows_of(train_rows), rows_of(eval_rows)
    tokens_in = sum(len(r.prompt_token_ids) + len(r.response_token_ids) for r in train_rows)
    fill = tokens_in / (len(train_packs) * data.max_length) if data.packing else 1.0
    log.info("%d training examples in %d rows (%.0f%% of each row's %d tokens used), %d eval examples; "
             "skipped %s", len(train_rows), len(train_packs), 100 * fill, data.max_length, len(eval_rows),
             skipped or "none")

    try:
        address = start_ray(cfg.ray, cfg.phases())
    except C.ConfigError as e:
        return refuse(e, "config error")

    run = offline.open_run(cfg, model_path, job="sft", objective="sft", storage=storage, run_name=run_name,
                           resume_from=resume_from, fork=fork, tags={"ray_address": address},
                           metrics={"data/train_examples": len(train_rows), "data/eval_examples": len(eval_rows),
                                    "data/train_rows": len(train_packs), "data/pack_fill": fill,
                                    **{f"data/skipped/{k}": v for k, v in skipped.items()}})
    learner, tracker = run.learner, run.tracker
    schedule = offline.EpochSchedule(len(train_packs), algo.minibatch_size, trainer.seed)
    total_steps = trainer.total_steps or schedule.per_epoch * algo.epochs
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def step_batch(examples: list, packs: list[list[int]], indices: list[int], seed: int):
        batch = packed_batch(examples, [packs[i] for i in indices], pad)
        plan = minibatch_plan(len(indices), algo.minibatch_size, cfg.learner.num_workers,
                              cfg.learner.micro_batch_size, 1, torch.Generator().manual_seed(seed))
        return batch, plan

    def train_step(step: int, indices: list[int]) -> tuple[dict[str, float], float, float]:
        batch, plan = step_batch(train_rows, train_packs, indices, trainer.seed * 100_003 + step)
        t0 = time.perf_counter()
        stats, _ = learner.train(ray.put(batch), plan, 1.0)
        return stats, float(batch["attention_mask"].sum()), time.perf_counter() - t0

    def evaluate(step: int) -> dict[str, float]:
        def chunks():
            for start in range(0, len(eval_packs), algo.minibatch_size):
                indices = list(range(start, min(start + algo.minibatch_size, len(eval_packs))))
                batch, plan = step_batch(eval_rows, eval_packs, indices, 0)
                yield batch, plan, float(batch["response_mask"].sum())  # the loss is a mean over tokens

        metrics = offline.evaluate_batches(run, chunks(), step)
        if "eval/loss" in metrics:
            metrics["eval/perplexity"] = math.exp(min(metrics["eval/loss"], 50.0))
            tracker.log_metrics({"eval/perplexity": metrics["eval/perplexity"]}, step=step)
        return metrics

    status = "FINISHED"
    try:
        first, last, eval_metrics = offline.train_steps(
            run, schedule, total_steps, trainer, train_step, evaluate if eval_rows else None,
            lambda stats: f"loss {stats.get('loss', float('nan')):.4f}")
        paths = offline.save_model(run, trainer.output_dir, model_path)
        summary = (trained_model_summary(cfg.model, cfg.engine, cfg.heldout, model_path, paths["merged"], tracker)
                   if cfg.heldout.enabled else None)
    except BaseException:
        status = "FAILED"
        raise
    finally:
        tracker.end(status)

    if first and last:
        print(f"\nsft: loss {first['train/loss']:.4f} -> {last['train/loss']:.4f} after {total_steps} steps, "
              f"{last['tokens_per_second']:.0f} tokens/s" +
              (f"; eval loss {eval_metrics['eval/loss']:.4f} (perplexity {eval_metrics['eval/perplexity']:.2f})"
               if "eval/loss" in eval_metrics else ""))
    if summary:
        print("\nheld-out answers (greedy), base vs SFT:\n" + summary)
    print(f"MLflow run {tracker.run_id} at {C.redact_url(tracker.uri)}\ncheckpoints: {storage}/{run_name}\nmodel: "
          + ", ".join(f"{k} {v}" for k, v in paths.items()))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
