"""Train a reward model on preference pairs -- the judge's labels distilled into a classifier, so that the RL loop
no longer calls a large judge for every sample (RLAIF, Lee et al. 2023) -- on the same learner as jobs/ppo.py.

Reads pairs (prompt, chosen, rejected; optional chosen_score / rejected_score, as jobs/generate_preferences.py
writes them), skips and counts the rows it cannot use, and holds out an eval split. The model is the backbone
(the policy's, or any causal LM) with a scalar head, an HF sequence classifier pooled at the last token; it reads
each whole chat-templated conversation exactly as a `kind: reward_model` component will
(`rayalign.judge.reward_model.conversation_ids`). The loss is InstructGPT's pairwise -log sigmoid(r_chosen -
r_rejected), with Llama 2's margin when ``algorithm.margin_scale`` > 0 (margin_scale x the judge's score gap);
the chosen and rejected rows of a pair share a micro-batch. Pairwise accuracy on the eval split is logged at
intervals. The learner is Ray Train + DeepSpeed (ZeRO 0-3), LoRA on the backbone (the head trained in full) or
full; checkpoints resume exactly. The result is one HF directory (``outputs/<run>/merged``) that a reward
component loads unchanged; the job ends by validating it with jobs/validate_judge.py on the labelled answers
(``validation.*``), the report in MLflow.

    python jobs/train_reward_model.py                              # the shipped pipeline pairs, LoRA, CPU
    python jobs/train_reward_model.py algorithm.margin_scale=1.0   # Llama 2's margin from the judge's score gap
    python jobs/train_reward_model.py data.train=runs/prefs/pairs.jsonl trainer.total_steps=200
    python jobs/train_reward_model.py trainer.resume=true          # continue the latest run from its last checkpoint
    python jobs/ppo.py --config jobs/configs/ppo_reward_model.yaml reward.components.0.model=outputs/<run>/merged
    python jobs/train_reward_model.py --config jobs/configs/reward_model_gpu.yaml
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rayalign import config as C  # noqa: E402

log = logging.getLogger("rayalign.reward_model")


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    enabled: bool = True
    """At the end, score labelled answers with the trained model (jobs/validate_judge.py) and log the report."""
    data: str = "builtin:vegetarian/judge_validation"
    """Labelled answers (prompt, response, label 1/0)."""
    limit: int | None = None
    """Validate on at most this many rows (None: all)."""

    def validate(self) -> None:
        if self.limit is not None:
            C.require_at_least("validation.limit", self.limit, 1)


@dataclasses.dataclass(frozen=True)
class RewardModelJobConfig:
    model: C.ModelConfig = C.ModelConfig()
    """The backbone the reward model starts from (its LM head is replaced by a scalar head)."""
    algorithm: C.RewardTrainingConfig = C.RewardTrainingConfig()
    """The pairwise loss, epochs and pairs per step."""
    learner: C.LearnerConfig = C.LearnerConfig(lr=5e-4, micro_batch_size=4)
    """Ray Train + DeepSpeed learner (micro_batch_size counts pairs: two sequences each)."""
    lora: C.LoraConfig = C.LoraConfig()
    """The backbone's adapter (learner.finetune=lora); the head always trains in full."""
    data: C.PreferenceDataConfig = C.PreferenceDataConfig(train="builtin:vegetarian/pipeline_pairs")
    """Which pairs (the default carries the judge's scores, for the margin)."""
    trainer: C.OfflineTrainerConfig = C.OfflineTrainerConfig()
    """Steps, evaluation, checkpoints, resume, outputs."""
    validation: ValidationConfig = ValidationConfig()
    """The check of the saved model as a reward component, at the end."""
    ray: C.RayConfig = C.RayConfig()
    """Which Ray."""
    tracking: C.TrackingConfig = C.TrackingConfig(experiment="rayalign-reward-model")
    """Where results go."""

    def phases(self) -> list:
        """What runs at once (`rayalign.placement`)."""
        from rayalign import placement as P

        return P.offline_phases(self.learner, None)

    def validate(self) -> None:
        per_step = self.learner.micro_batch_size * self.learner.num_workers
        if self.algorithm.minibatch_size % per_step:
            raise C.ConfigError(f"algorithm.minibatch_size ({self.algorithm.minibatch_size}) must be a multiple of "
                                f"learner.micro_batch_size x learner.num_workers ({per_step})")


def main(argv: list[str] | None = None) -> int:
    cfg = C.parse_job_config(RewardModelJobConfig, argv, description=__doc__ or "")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from rayalign.data import preferences as P
    from rayalign.job import INPUT_ERRORS, load_job_inputs, refuse, start_ray
    from rayalign.learner.checkpoints import resolve_run

    algo, trainer = cfg.algorithm, cfg.trainer
    try:
        model_path = load_job_inputs(cfg.model.name, None, None).model_path
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        train, evals = P.load_split(lambda name, limit: P.load_preferences(name, limit=limit), cfg.data,
                                    trainer.seed)
        train, train_rows = P.drop_overlong(train, conversation_rows(train.examples, tokenizer), cfg.data.max_length)
        eval_rows = conversation_rows(evals.examples, tokenizer) if evals.examples else []
        if eval_rows:
            evals, eval_rows = P.drop_overlong(evals, eval_rows, cfg.data.max_length)
        storage, run_name, resume_from, fork = resolve_run(trainer, prefix="reward-model")
    except INPUT_ERRORS as e:
        return refuse(e)
    skipped = {**train.skipped, **{f"eval: {k}": v for k, v in evals.skipped.items()}}
    unscored = sum(e.score_gap is None for e in train.examples)
    if algo.margin_scale > 0 and unscored:
        log.warning("%d of %d training pairs carry no judge scores: their margin is 0", unscored, len(train_rows))
    log.info("%d training and %d eval pairs from %s; skipped %s", len(train_rows), len(eval_rows), train.source,
             skipped or "none")

    import ray
    import torch

    from rayalign.learner import offline
    from rayalign.learner.batch import pad_rollouts, pair_plan

    try:
        address = start_ray(cfg.ray, cfg.phases())
    except C.ConfigError as e:
        return refuse(e, "config error")

    run = offline.open_run(cfg, model_path, job="reward_model", objective="reward_model", storage=storage,
                           run_name=run_name, resume_from=resume_from, fork=fork, tags={"ray_address": address},
                           metrics={"data/train_pairs": len(train_rows), "data/eval_pairs": len(eval_rows),
                                    "data/pairs_without_scores": unscored,
                                    **{f"data/skipped/{k}": v for k, v in skipped.items()}})
    learner, tracker = run.learner, run.tracker
    schedule = offline.EpochSchedule(len(train_rows), algo.minibatch_size, trainer.seed)
    total_steps = trainer.total_steps or schedule.per_epoch * algo.epochs
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def step_batch(rows: list[list], examples, indices: list[int], seed: int):
        """The padded rows of pairs ``indices`` (padded with the token the head skips when it pools), each row's
        judge score gap, and a plan that keeps each pair in one micro-batch, like lengths together."""
        batch = pad_rollouts([r for i in indices for r in rows[i]], pad_token_id=pad)
        batch["score_gap"] = torch.tensor([examples[i].score_gap or 0.0 for i in indices for _ in range(2)])
        plan = pair_plan(len(indices), algo.minibatch_size, cfg.learner.num_workers, cfg.learner.micro_batch_size,
                         1, torch.Generator().manual_seed(seed),
                         lengths=[max(len(r.response_token_ids) for r in rows[i]) for i in indices])
        return batch, plan

    def train_step(step: int, indices: list[int]) -> tuple[dict[str, float], float, float]:
        batch, plan = step_batch(train_rows, train.examples, indices, trainer.seed * 100_003 + step)
        t0 = time.perf_counter()
        stats, _ = learner.train(ray.put(batch), plan, 1.0)
        return stats, float(batch["attention_mask"].sum()), time.perf_counter() - t0

    def evaluate(step: int) -> dict[str, float]:
        chunks = (list(range(start, min(start + algo.minibatch_size, len(eval_rows))))
                  for start in range(0, len(eval_rows), algo.minibatch_size))
        return offline.evaluate_batches(run, ((*step_batch(eval_rows, evals.examples, indices, 0), len(indices))
                                              for indices in chunks), step)

    def describe(stats: dict[str, float]) -> str:
        return (f"loss {stats.get('loss', float('nan')):.4f} accuracy {stats.get('rewards/accuracy', 0.0):.2f} "
                f"margin {stats.get('rewards/margin', 0.0):.3f}")

    status = "FINISHED"
    validation = None
    try:
        first, last, eval_metrics = offline.train_steps(run, schedule, total_steps, trainer, train_step,
                                                        evaluate if eval_rows else None, describe)
        paths = offline.save_model(run, trainer.output_dir, model_path)
        ray.shutdown()  # the validation starts a Ray of its own, with the reward model's actor
        if cfg.validation.enabled:
            validation = validate_as_reward(cfg, paths["merged"], Path(paths["merged"]).parent / "validation")
            tracker.log_metrics({f"validation/{k}": v for k, v in validation.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=total_steps)
            tracker.log_dict(validation, "validation/metrics.json")
    except BaseException:
        status = "FAILED"
        raise
    finally:
        tracker.end(status)

    if first and last:
        print(f"\nreward model: loss {first['train/loss']:.4f} -> {last['train/loss']:.4f}, pairwise accuracy "
              f"{first['train/rewards/accuracy']:.2f} -> {last['train/rewards/accuracy']:.2f} after {total_steps} "
              "steps" + (f"; eval pairwise accuracy {eval_metrics['eval/rewards/accuracy']:.2f} on "
                         f"{len(eval_rows)} held-out pairs" if "eval/rewards/accuracy" in eval_metrics else ""))
    if validation:
        auc = "n/a (one label only)" if validation.get("auc") is None else f"{validation['auc']:.3f}"
        print(f"as a reward component on {validation['judged']} labelled answers ({cfg.validation.data}): ROC AUC "
              f"{auc}, accuracy {validation['accuracy']:.3f} at score 0.5; report in {validation['out']}")
    print(f"MLflow run {tracker.run_id} at {C.redact_url(tracker.uri)}\ncheckpoints: {storage}/{run_name}\nreward "
          f"model: {paths['merged']}  (a reward component: kind: reward_model, model: {paths['merged']})")
    return 0


def conversation_rows(examples, tokenizer) -> list[list]:
    """Each pair as [chosen, rejected] `Rollout`s whose tokens are the whole conversations a reward component
    reads (all of it counts as the "response": the head reads the last token)."""
    from rayalign.judge.reward_model import conversation_ids
    from rayalign.types import Rollout

    def row(e, text: str) -> Rollout:
        return Rollout(prompt=e.prompt[-1][1], response=text, prompt_token_ids=(),
                       response_token_ids=tuple(conversation_ids(tokenizer, e.prompt, text)), logprobs=(),
                       finish_reason="stop", policy_version=0, engine_id=-1)

    return [[row(e, e.chosen), row(e, e.rejected)] for e in examples]


def validate_as_reward(cfg: RewardModelJobConfig, model_dir: str, out: Path) -> dict:
    """Run jobs/validate_judge.py with the trained model as the only reward component: it loads the directory as
    every reward component will. Returns its metrics (the last stdout line)."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    reward_file = out / "reward.yaml"
    reward_file.write_text(yaml.safe_dump({"components": [{"name": "reward_model", "kind": "reward_model",
                                                           "model": model_dir, "weight": 1.0}]}))
    command = [sys.executable, str(Path(__file__).with_name("validate_judge.py")), "--reward-config",
               str(reward_file), "--data", cfg.validation.data, "--out", str(out),
               f"tracking.experiment={cfg.tracking.experiment}-validation"]  # the same MLflow store (cwd, env)
    if cfg.validation.limit:
        command.append(f"data.limit={cfg.validation.limit}")
    if cfg.ray.address:
        command.append(f"ray.address={cfg.ray.address}")
    log.info("validating %s as a reward component: %s", model_dir, " ".join(command))
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"validating the reward model failed (exit {done.returncode}): {tail}")
    log.info("validation done in %.0f s", time.perf_counter() - t0)
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
