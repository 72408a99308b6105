"""What the jobs that train on a fixed dataset share around the learner (jobs/dpo.py, jobs/sft.py,
jobs/train_reward_model.py): the learner and its MLflow run opened or resumed, a seeded per-epoch order of the
examples, the step loop with its metrics, evaluation and checkpoints at intervals, and the saved model.

A step is the job's own function (which rows, which batch, what the learner is asked); the loop around it is here.
Exact resume: the step number fixes the examples (`EpochSchedule`), the checkpoint holds the weights, the
optimizer, the RNG and the driver's state.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EpochSchedule:
    """Which examples each step trains on: the next ``minibatch_size`` of a seeded shuffle, reshuffled each epoch."""

    examples: int
    minibatch_size: int
    seed: int

    @property
    def per_epoch(self) -> int:
        return math.ceil(self.examples / self.minibatch_size)

    def at(self, step: int) -> tuple[int, list[int]]:
        """(epoch, the example indices step ``step`` (from 1) trains on)."""
        epoch, offset = divmod(step - 1, self.per_epoch)
        order = list(range(self.examples))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return epoch, order[offset * self.minibatch_size:(offset + 1) * self.minibatch_size]


@dataclasses.dataclass
class OfflineRun:
    """A learner with its MLflow run and checkpoint bookkeeping (`open_run`)."""

    learner: Any
    tracker: Any
    state: dict[str, Any]
    """The driver state saved with each checkpoint: ``step`` and ``mlflow_run_id``."""
    trainable_params: int
    storage: str
    run_name: str
    last_checkpoint: int = -1

    def checkpoint(self, step: int) -> None:
        from rayalign.learner.checkpoints import mark_complete

        self.state["step"] = step
        self.learner.checkpoint(step, dict(self.state))
        mark_complete(self.storage, self.run_name, step)
        self.last_checkpoint = step


def open_run(cfg: Any, model_path: str, *, job: str, objective: str, storage: str, run_name: str,
             resume_from: str | None, fork: bool, metrics: dict[str, float], tags: dict[str, str]) -> OfflineRun:
    """Start the learner (``cfg.learner``/``lora``/``algorithm``/``trainer``) on ``objective``, restore
    ``resume_from`` if given, and open -- or, resuming in place, continue -- the MLflow run (with ``tags``),
    logging ``metrics``."""
    from rayalign.learner.group import Learner
    from rayalign.tracking import Tracker

    learner = Learner(model_path, learner=cfg.learner, lora=cfg.lora, algorithm=cfg.algorithm, storage_path=storage,
                      run_name=run_name, seed=cfg.trainer.seed, resume_from=resume_from, objective=objective)
    setup = learner.setup()
    state = setup["driver_state"] or {"step": 0, "mlflow_run_id": None}
    if resume_from and setup["driver_state"] is None:
        raise RuntimeError(f"the learner restored no driver state from {resume_from}")
    tracker = Tracker(cfg.tracking.experiment, run_name=cfg.tracking.run_name or run_name, config=cfg,
                      run_id=None if fork else state["mlflow_run_id"],
                      tags={"job": job, "algorithm": objective, "checkpoints": storage, **tags,
                            **({"resumed_from": resume_from} if fork else {})})
    state["mlflow_run_id"] = tracker.run_id
    tracker.log_metrics({"learner/trainable_params": setup["trainable_params"], **metrics}, step=state["step"])
    log.info("learner ready: %s trainable parameters%s", f"{setup['trainable_params']:,}",
             f", resumed at step {state['step']}" if resume_from else "")
    return OfflineRun(learner, tracker, state, setup["trainable_params"], storage, run_name,
                      last_checkpoint=state["step"] if resume_from and not fork else -1)


StepFn = Callable[[int, list[int]], tuple[dict[str, float], float, float]]
"""(step, example indices) -> (the learner's statistics, tokens trained on, seconds)."""


def train_steps(run: OfflineRun, schedule: EpochSchedule, total_steps: int, trainer: Any, step_fn: StepFn,
                evaluate: Callable[[int], dict[str, float]] | None,
                describe: Callable[[dict[str, float]], str]) -> tuple[dict | None, dict | None, dict[str, float]]:
    """Steps ``run.state["step"] + 1`` .. ``total_steps``: each step's metrics to MLflow and one log line
    (``describe(stats)`` after the step count), ``evaluate(step)`` every ``trainer.eval_every`` steps and at the
    end, checkpoints every ``trainer.checkpoint_every`` steps and at the end. Returns the first and last steps'
    metrics (None when none ran) and the last evaluation's."""
    first = last = None
    eval_metrics: dict[str, float] = {}
    evaluated_at = -1
    for step in range(run.state["step"] + 1, total_steps + 1):
        epoch, indices = schedule.at(step)
        stats, tokens, seconds = step_fn(step, indices)
        metrics = {f"train/{k}": v for k, v in stats.items() if k != "tokens"}
        metrics.update({"time/train": seconds, "tokens_per_second": tokens / seconds, "epoch": float(epoch)})
        run.tracker.log_metrics(metrics, step=step)
        first = first or metrics
        last = metrics
        log.info("step %d/%d (epoch %d) %s | %.1f s, %.0f tokens/s", step, total_steps, epoch + 1, describe(stats),
                 seconds, tokens / seconds)
        if evaluate and trainer.eval_every and step % trainer.eval_every == 0:
            eval_metrics, evaluated_at = _evaluated(evaluate, step), step
        if trainer.checkpoint_every and step % trainer.checkpoint_every == 0:
            run.checkpoint(step)
    if evaluate and evaluated_at != total_steps:
        eval_metrics = _evaluated(evaluate, total_steps)
    if run.last_checkpoint < total_steps:
        run.checkpoint(total_steps)
    return first, last, eval_metrics


def _evaluated(evaluate: Callable[[int], dict[str, float]], step: int) -> dict[str, float]:
    t0 = time.perf_counter()
    metrics = evaluate(step)
    shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in sorted(metrics.items())
                      if k.endswith(("loss", "accuracy", "margin", "perplexity")))
    log.info("eval at step %d: %s | %.1f s", step, shown or "nothing to evaluate", time.perf_counter() - t0)
    return metrics


def evaluate_batches(run: OfflineRun, batches: Iterable[tuple[Any, list, float]], step: int) -> dict[str, float]:
    """The learner's statistics without updates over ``batches`` ((batch, plan, weight) each), averaged with the
    weights (their examples or tokens), logged as ``eval/...`` at ``step``."""
    import ray

    sums: dict[str, float] = {}
    total = 0.0
    for batch, plan, weight in batches:
        stats, _ = run.learner.train(ray.put(batch), plan, 1.0, update=False)
        for k, v in stats.items():
            if k not in ("optimizer_steps", "lr", "grad_norm"):
                sums[k] = sums.get(k, 0.0) + v * weight
        total += weight
    metrics = {f"eval/{k}": v / total for k, v in sums.items()} if total else {}
    run.tracker.log_metrics(metrics, step=step)
    return metrics


def save_model(run: OfflineRun, output_dir: str, model_path: str) -> dict[str, str]:
    """The final model in HF format under ``output_dir/<run name>`` (`rayalign.learner.export.save_model`), logged
    as MLflow artifacts; then the learner stops."""
    output = Path(output_dir).expanduser().resolve() / run.run_name
    t0 = time.perf_counter()
    paths = run.learner.save(str(output), model_path)
    for kind, path in paths.items():
        run.tracker.log_artifact(path, f"model/{kind}" if Path(path).is_dir() else "model")
    log.info("saved %s in %.1f s", ", ".join(f"{k} {v}" for k, v in paths.items()), time.perf_counter() - t0)
    run.learner.shutdown()
    return paths
