"""Align a chat policy on preference data with DPO, IPO, KTO or SimPO, on the same learner as jobs/ppo.py.

Reads pairs (prompt, chosen, rejected) -- or, for KTO, responses labelled good or bad -- tokenizes them with the
policy's chat template, skips and counts the rows it cannot use, and holds out an eval split. The learner is
the PPO job's: Ray Train workers running DeepSpeed (ZeRO 0-3) over the policy with LoRA or fully trainable; only
the objective differs (`rayalign.learner.objectives`). The reference's sequence logprobs are computed once, in
one pass before training (under LoRA: the policy with its adapter off), and kept with the rows; SimPO needs none.
Each step trains on the next ``algorithm.minibatch_size`` examples of a seeded per-epoch shuffle, chosen and
rejected of a pair in one micro-batch. Metrics, checkpoints (exact resume: the step fixes the examples) and the
final adapter and merged model go where jobs/ppo.py puts them, so jobs/serve.py and jobs/evaluate.py take the
run id. It ends, by default, with a held-out summary: base and aligned answers to the held-out prompts, greedy,
side by side (`rayalign.evaluation.heldout`).

Departures from the papers: KTO's reference point is each micro-batch's mean log-ratio (clamped at 0), not a
KL estimated on mismatched pairs; IPO takes summed, not per-token-mean, logprobs.

    python jobs/dpo.py                                          # DPO on the shipped vegetarian pairs, LoRA, CPU
    python jobs/dpo.py algorithm.name=kto data.train=builtin:vegetarian/kto
    python jobs/dpo.py algorithm.name=simpo algorithm.beta=2.0 algorithm.simpo_gamma=0.5
    python jobs/dpo.py data.train=my_pairs.parquet data.eval=my_eval.jsonl algorithm.label_smoothing=0.1
    python jobs/dpo.py trainer.resume=true                      # continue the latest run from its last checkpoint
    python jobs/dpo.py --config jobs/configs/dpo_gpu.yaml       # an 8B policy on 4 learner GPUs
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rayalign import config as C  # noqa: E402

log = logging.getLogger("rayalign.dpo")


@dataclasses.dataclass(frozen=True)
class DPOJobConfig:
    model: C.ModelConfig = C.ModelConfig()
    """The policy to align (and the reference: its starting point)."""
    algorithm: C.PreferenceConfig = C.PreferenceConfig(beta=0.1, epochs=1, minibatch_size=8)
    """Which preference objective, and its settings."""
    learner: C.LearnerConfig = C.LearnerConfig(lr=5e-4, micro_batch_size=4)
    """Ray Train + DeepSpeed learner (micro_batch_size counts examples: a pair is two sequences)."""
    lora: C.LoraConfig = C.LoraConfig()
    """The adapter (learner.finetune=lora)."""
    data: C.PreferenceDataConfig = C.PreferenceDataConfig()
    """Which preference data."""
    trainer: C.OfflineTrainerConfig = C.OfflineTrainerConfig()
    """Steps, evaluation, checkpoints, resume, outputs."""
    heldout: C.HeldOutConfig = C.HeldOutConfig()
    """The held-out summary at the end."""
    engine: C.EngineConfig = C.EngineConfig()
    """vLLM engines for the held-out answers."""
    ray: C.RayConfig = C.RayConfig(num_cpus=4)
    """Which Ray. The learner and the held-out engines take turns, so the local default's 4 logical CPUs may
    exceed the cores."""
    tracking: C.TrackingConfig = C.TrackingConfig(experiment="rayalign-dpo")
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
        if self.learner.finetune == "lora" and self.lora.dropout > 0:
            raise C.ConfigError("lora.dropout: the reference logprobs are computed once without dropout; "
                                "expected 0")


def main(argv: list[str] | None = None) -> int:
    cfg = C.parse_job_config(DPOJobConfig, argv, description=__doc__ or "")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from rayalign.data import preferences as P
    from rayalign.job import INPUT_ERRORS, load_job_inputs, refuse, start_ray
    from rayalign.learner.checkpoints import resolve_run

    algo, trainer = cfg.algorithm, cfg.trainer
    try:
        model_path = load_job_inputs(cfg.model.name, None, None).model_path
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        train, evals = P.load_split(lambda name, limit: P.load_preferences(name, labelled=not algo.paired,
                                                                          limit=limit), cfg.data, trainer.seed)
        train, train_rows = P.drop_overlong(train, P.tokenize(train.examples, tokenizer), cfg.data.max_length)
        eval_rows = P.tokenize(evals.examples, tokenizer) if evals.examples else []
        if eval_rows:
            evals, eval_rows = P.drop_overlong(evals, eval_rows, cfg.data.max_length)
        storage, run_name, resume_from, fork = resolve_run(trainer, prefix=algo.name)
    except INPUT_ERRORS as e:
        return refuse(e)
    skipped = {**train.skipped, **{f"eval: {k}": v for k, v in evals.skipped.items()}}
    log.info("%d training and %d eval examples from %s; skipped %s", len(train_rows), len(eval_rows),
             train.source, skipped or "none")

    import ray
    import torch

    from rayalign.evaluation.generation import trained_model_summary
    from rayalign.learner import offline
    from rayalign.learner.batch import minibatch_plan, pad_rollouts, pair_plan
    from rayalign.learner.objectives import objective

    try:
        address = start_ray(cfg.ray, cfg.phases())
    except C.ConfigError as e:
        return refuse(e, "config error")

    run = offline.open_run(cfg, model_path, job="dpo", objective=algo.name, storage=storage, run_name=run_name,
                           resume_from=resume_from, fork=fork, tags={"ray_address": address},
                           metrics={"data/train_examples": len(train_rows), "data/eval_examples": len(eval_rows),
                                    **{f"data/skipped/{k}": v for k, v in skipped.items()}})
    learner, tracker, state = run.learner, run.tracker, run.state

    def length(example: list) -> int:
        return max(len(r.prompt_token_ids) + len(r.response_token_ids) for r in example)

    learner_seconds = [0.0]

    def reference_logps(rows: list[list], skip: frozenset[int] = frozenset()) -> list[float | None]:
        """The reference's summed response logprobs of every row (examples in row order; None for the examples
        in ``skip``), computed longest examples first, so that each micro-batch (cut to its own padding on the
        learner) holds like lengths; in chunks of 256 examples, to bound what one call holds."""
        out: list[float | None] = [None] * sum(len(ex) for ex in rows)
        first_row = [0]
        for ex in rows:
            first_row.append(first_row[-1] + len(ex))
        by_length = sorted((i for i in range(len(rows)) if i not in skip), key=lambda i: -length(rows[i]))
        for start in range(0, len(by_length), 256):
            picked = by_length[start:start + 256]
            batch = pad_rollouts([r for i in picked for r in rows[i]])
            reply = learner.forward(ray.put(batch), len(batch["response_mask"]), 1.0, policy=False)
            learner_seconds[0] += reply["seconds"]
            sums = (reply["ref_logprobs"] * batch["response_mask"]).sum(dim=1).tolist()
            at = 0
            for i in picked:
                for k in range(len(rows[i])):
                    out[first_row[i] + k] = sums[at]
                    at += 1
        return out

    schedule = offline.EpochSchedule(len(train_rows), algo.minibatch_size, trainer.seed)
    total_steps = trainer.total_steps or schedule.per_epoch * algo.epochs

    t0 = time.perf_counter()
    needs_reference = objective(algo.name).needs_reference
    # A fresh run's first step trains a policy that is still the reference (LoRA's B starts at 0, a full finetune
    # as a copy), so that step's own forward gives its rows' reference logprobs: the pass skips them.
    from_first_step = frozenset(schedule.at(1)[1]) if needs_reference and state["step"] == 0 else frozenset()
    train_ref = reference_logps(train_rows, from_first_step) if needs_reference else None
    eval_ref = reference_logps(eval_rows) if needs_reference and eval_rows else None
    tracker.log_metrics({"time/reference_pass": time.perf_counter() - t0,
                         "time/reference_pass_learner": learner_seconds[0],
                         "reference/from_first_step": float(len(from_first_step))}, step=state["step"])

    def plan_fn(rows: list[list], indices: list[int], seed: int):
        """One step's plan over the examples ``indices``; pairs of like length share micro-batches."""
        args = (len(indices), algo.minibatch_size, cfg.learner.num_workers, cfg.learner.micro_batch_size, 1,
                torch.Generator().manual_seed(seed))
        if algo.paired:
            return pair_plan(*args, lengths=[length(rows[i]) for i in indices])
        return minibatch_plan(*args)

    def step_batch(rows: list[list], refs: list[float] | None, labels: list, indices: list[int]):
        """The padded rows of examples ``indices``, their reference logps and labels, and one step's plan."""
        picked = [rows[i] for i in indices]
        batch = pad_rollouts([r for ex in picked for r in ex])
        per_example = len(picked[0])
        if refs is not None and all(refs[i * per_example] is not None for i in indices):
            batch["ref_logps"] = torch.tensor([refs[i * per_example + k] for i in indices for k in range(per_example)])
        if not algo.paired:
            batch["label"] = torch.tensor([float(labels[i]) for i in indices])
        return batch

    def evaluate(step: int) -> dict[str, float]:
        labels = [e.label for e in evals.examples]
        chunks = (list(range(start, min(start + algo.minibatch_size, len(eval_rows))))
                  for start in range(0, len(eval_rows), algo.minibatch_size))
        return offline.evaluate_batches(run, ((step_batch(eval_rows, eval_ref, labels, indices),
                                               plan_fn(eval_rows, indices, 0), len(indices)) for indices in chunks),
                                        step)

    train_labels = [e.label for e in train.examples]

    def train_step(step: int, indices: list[int]) -> tuple[dict[str, float], float, float]:
        batch = step_batch(train_rows, train_ref, train_labels, indices)
        plan = plan_fn(train_rows, indices, trainer.seed * 100_003 + step)
        own_reference = "ref_logps" not in batch and train_ref is not None  # the first step's rows
        t_step = time.perf_counter()
        stats, seen = learner.train(ray.put(batch), plan, 1.0, policy_is_reference=own_reference)
        seconds = time.perf_counter() - t_step
        if own_reference:
            per_example = len(train_rows[indices[0]])
            for row, value in enumerate(seen["ref_logps"].tolist()):
                train_ref[indices[row // per_example] * per_example + row % per_example] = value
        return stats, float(batch["attention_mask"].sum()), seconds

    def describe(stats: dict[str, float]) -> str:
        return (f"loss {stats.get('loss', float('nan')):.4f} accuracy {stats.get('rewards/accuracy', 0.0):.2f} "
                f"margin {stats.get('rewards/margin', 0.0):.3f}")

    status = "FINISHED"
    try:
        first, last, eval_metrics = offline.train_steps(run, schedule, total_steps, trainer, train_step,
                                                        evaluate if eval_rows else None, describe)
        paths = offline.save_model(run, trainer.output_dir, model_path)
        summary = (trained_model_summary(cfg.model, cfg.engine, cfg.heldout, model_path, paths["merged"], tracker)
                   if cfg.heldout.enabled else None)
    except BaseException:
        status = "FAILED"
        raise
    finally:
        tracker.end(status)

    if first and last:
        print(f"\n{algo.name}: loss {first['train/loss']:.4f} -> {last['train/loss']:.4f}, reward accuracy "
              f"{first.get('train/rewards/accuracy', 0):.2f} -> {last.get('train/rewards/accuracy', 0):.2f} after "
              f"{total_steps} steps" + (f"; eval accuracy {eval_metrics.get('eval/rewards/accuracy', 0):.2f}"
                                        if eval_metrics else ""))
    if summary:
        print("\nheld-out answers (greedy), base vs aligned:\n" + summary)
    print(f"MLflow run {tracker.run_id} at {C.redact_url(tracker.uri)}\ncheckpoints: {storage}/{run_name}\nmodel: "
          + ", ".join(f"{k} {v}" for k, v in paths.items()))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
