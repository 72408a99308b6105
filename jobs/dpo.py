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
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rayalign import config as C  # noqa: E402

log = logging.getLogger("rayalign.dpo")


@dataclasses.dataclass(frozen=True)
class PreferenceDataConfig:
    train: str = "builtin:vegetarian/pairs"
    """Pairs (prompt/chosen/rejected) or, for kto, prompt/completion/label: JSONL, Parquet, a saved `datasets`
    directory or a shipped set builtin:<name>/<split>."""
    eval: str = ""
    """A separate eval set in the same form (empty: hold out eval_fraction of train)."""
    eval_fraction: float = 0.1
    """Share of train held out for evaluation when eval is empty."""
    limit: int | None = None
    """Use at most this many training examples (None: all)."""
    max_length: int = 512
    """Examples with a row of more prompt + response tokens are skipped and counted."""

    def validate(self) -> None:
        if not 0 <= self.eval_fraction < 1:
            raise C.ConfigError(f"data.eval_fraction: expected a float in [0, 1), got {self.eval_fraction}")
        C.require_at_least("data.max_length", self.max_length, 8)
        if self.limit is not None:
            C.require_at_least("data.limit", self.limit, 1)


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
    data: PreferenceDataConfig = PreferenceDataConfig()
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
    from rayalign.learner.checkpoints import mark_complete, resolve_run

    algo, trainer = cfg.algorithm, cfg.trainer
    try:
        model_path = load_job_inputs(cfg.model.name, None, None).model_path
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        train, evals = load_split(cfg.data, labelled=not algo.paired, seed=trainer.seed)
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

    from rayalign.learner.batch import minibatch_plan, pad_rollouts, pair_plan
    from rayalign.learner.group import Learner
    from rayalign.learner.objectives import objective
    from rayalign.tracking import Tracker

    needs = {"CPU": cfg.learner.num_workers * cfg.learner.num_cpus_per_worker,
             "GPU": cfg.learner.num_workers * cfg.learner.num_gpus_per_worker}
    try:
        address = start_ray(cfg.ray, needs)
    except C.ConfigError as e:
        return refuse(e, "config error")

    learner = Learner(model_path, learner=cfg.learner, lora=cfg.lora, algorithm=algo, storage_path=storage,
                      run_name=run_name, seed=trainer.seed, resume_from=resume_from, objective=algo.name)
    setup = learner.setup()
    state = setup["driver_state"] or {"step": 0, "mlflow_run_id": None}
    if resume_from and setup["driver_state"] is None:
        raise RuntimeError(f"the learner restored no driver state from {resume_from}")
    tracker = Tracker(cfg.tracking.experiment, run_name=cfg.tracking.run_name or run_name, config=cfg,
                      run_id=None if fork else state["mlflow_run_id"],
                      tags={"job": "dpo", "algorithm": algo.name, "ray_address": address, "checkpoints": storage,
                            **({"resumed_from": resume_from} if fork else {})})
    state["mlflow_run_id"] = tracker.run_id
    tracker.log_metrics({"learner/trainable_params": setup["trainable_params"], "data/train_examples":
                         len(train_rows), "data/eval_examples": len(eval_rows),
                         **{f"data/skipped/{k}": v for k, v in skipped.items()}}, step=state["step"])

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

    per_epoch = math.ceil(len(train_rows) / algo.minibatch_size)
    total_steps = trainer.total_steps or per_epoch * algo.epochs

    def step_indices(step: int) -> tuple[int, list[int]]:
        """(epoch, the examples step ``step`` trains on): the next minibatch of a seeded per-epoch shuffle."""
        epoch, offset = divmod(step - 1, per_epoch)
        order = list(range(len(train_rows)))
        random.Random(trainer.seed * 1_000_003 + epoch).shuffle(order)
        return epoch, order[offset * algo.minibatch_size:(offset + 1) * algo.minibatch_size]

    t0 = time.perf_counter()
    needs_reference = objective(algo.name).needs_reference
    # A fresh run's first step trains a policy that is still the reference (LoRA's B starts at 0, a full finetune
    # as a copy), so that step's own forward gives its rows' reference logprobs: the pass skips them.
    from_first_step = frozenset(step_indices(1)[1]) if needs_reference and state["step"] == 0 else frozenset()
    train_ref = reference_logps(train_rows, from_first_step) if needs_reference else None
    eval_ref = reference_logps(eval_rows) if needs_reference and eval_rows else None
    tracker.log_metrics({"time/reference_pass": time.perf_counter() - t0,
                         "time/reference_pass_learner": learner_seconds[0],
                         "reference/from_first_step": float(len(from_first_step))}, step=state["step"])
    last_checkpoint = state["step"] if resume_from and not fork else -1

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
        stats_sum: dict[str, float] = {}
        count = 0.0
        labels = [e.label for e in evals.examples]
        for start in range(0, len(eval_rows), algo.minibatch_size):
            indices = list(range(start, min(start + algo.minibatch_size, len(eval_rows))))
            batch = step_batch(eval_rows, eval_ref, labels, indices)
            plan = plan_fn(eval_rows, indices, 0)
            stats, _ = learner.train(ray.put(batch), plan, 1.0, update=False)
            for k, v in stats.items():
                if k not in ("optimizer_steps", "lr", "grad_norm"):
                    stats_sum[k] = stats_sum.get(k, 0.0) + v * len(indices)
            count += len(indices)
        metrics = {f"eval/{k}": v / count for k, v in stats_sum.items()} if count else {}
        tracker.log_metrics(metrics, step=step)
        return metrics

    def checkpoint(step: int) -> None:
        nonlocal last_checkpoint
        state["step"] = step
        learner.checkpoint(step, dict(state))
        mark_complete(storage, run_name, step)
        last_checkpoint = step

    status = "FINISHED"
    first = last = None
    eval_metrics: dict[str, float] = {}
    evaluated_at = -1
    try:
        labels = [e.label for e in train.examples]
        for step in range(state["step"] + 1, total_steps + 1):
            epoch, indices = step_indices(step)
            batch = step_batch(train_rows, train_ref, labels, indices)
            plan = plan_fn(train_rows, indices, trainer.seed * 100_003 + step)
            own_reference = "ref_logps" not in batch and train_ref is not None  # the first step's rows
            t_step = time.perf_counter()
            stats, seen = learner.train(ray.put(batch), plan, 1.0, policy_is_reference=own_reference)
            seconds = time.perf_counter() - t_step
            if own_reference:
                per_example = len(train_rows[indices[0]])
                for row, value in enumerate(seen["ref_logps"].tolist()):
                    train_ref[indices[row // per_example] * per_example + row % per_example] = value
            tokens = float(batch["attention_mask"].sum())
            metrics = {f"train/{k}": v for k, v in stats.items() if k != "tokens"}
            metrics.update({"time/train": seconds, "tokens_per_second": tokens / seconds, "epoch": float(epoch)})
            tracker.log_metrics(metrics, step=step)
            first = first or metrics
            last = metrics
            log.info("step %d/%d (epoch %d) loss %.4f accuracy %.2f margin %.3f | %.1f s, %.0f tokens/s", step,
                     total_steps, epoch + 1, stats.get("loss", float("nan")), stats.get("rewards/accuracy", 0.0),
                     stats.get("rewards/margin", 0.0), seconds, tokens / seconds)
            if eval_rows and trainer.eval_every and step % trainer.eval_every == 0:
                eval_metrics, evaluated_at = evaluate(step), step
            if trainer.checkpoint_every and step % trainer.checkpoint_every == 0:
                checkpoint(step)
        if eval_rows and evaluated_at != total_steps:
            eval_metrics = evaluate(total_steps)
        if last_checkpoint < total_steps:
            checkpoint(total_steps)
        output = Path(trainer.output_dir).expanduser().resolve() / run_name
        paths = learner.save(str(output), model_path)
        for kind, path in paths.items():
            tracker.log_artifact(path, f"model/{kind}" if Path(path).is_dir() else "model")
        learner.shutdown()
        summary = heldout_summary(cfg, model_path, paths, tracker) if cfg.heldout.enabled else None
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


def load_split(data: PreferenceDataConfig, labelled: bool, seed: int):
    """(train, eval) preference sets: ``data.eval`` when given, else a seeded hold-out of ``data.train``."""
    from rayalign.data import preferences as P

    train = P.load_preferences(data.train, labelled=labelled, limit=data.limit)
    if data.eval:
        return train, P.load_preferences(data.eval, labelled=labelled)
    return P.split_holdout(train, data.eval_fraction, seed)


def heldout_summary(cfg: DPOJobConfig, model_path: str, paths: dict[str, str], tracker) -> str:
    """Greedy answers of the base and the aligned policy to the held-out prompts, summarised side by side by the
    measures that need no judge (rayalign.evaluation.report; `jobs/ppo.py` ends with the same report)."""
    import tempfile

    from rayalign.data.prompts import drop_overlong_prompts, load_prompts
    from rayalign.evaluation import report as R
    from rayalign.evaluation.generation import generate_all
    from rayalign.models import ResolvedModel, resolve_model_spec

    from transformers import AutoTokenizer

    held = cfg.heldout
    prompts = list(drop_overlong_prompts(load_prompts(held.prompts, limit=held.limit),
                                         AutoTokenizer.from_pretrained(model_path),
                                         cfg.engine.max_model_len - held.max_new_tokens).prompts)
    base = ResolvedModel("base", model_path, "base", cfg.model.name)
    with tempfile.TemporaryDirectory() as downloads:
        # the merged model on engines of its own: vLLM's CPU LoRA kernels decode several times slower than the base
        aligned = resolve_model_spec(paths["merged"], Path(downloads), what="aligned")
        aligned = dataclasses.replace(aligned, label="aligned")
        rollouts, times = generate_all(base, [aligned], prompts, cfg.model, cfg.engine, held.sampling)
    report = R.heldout_report(prompts, held, {label: R.answers(rs) for label, rs in rollouts.items()},
                              judgements=None, threshold=0.5)
    tracker.log_metrics({f"heldout/{k}": v for k, v in {**R.flat_metrics(report), **times}.items()}, step=0)
    tracker.log_dict(report, "heldout/report.json")
    return R.text_table(report) + "\n\n" + R.text_examples(report["samples"])


if __name__ == "__main__":
    sys.exit(main())
