"""Validate a reward (an LLM judge alone, or a composite) on labelled answers before trusting it.

Rows: JSONL with `prompt`, `response`, `label` (1 = good, 0 = bad) and optionally `category`. Each row is scored;
score >= the rubric's threshold counts as "good". Reports accuracy, precision, recall, F1 (good = positive), ROC AUC (how well scores rank good above bad),
the confusion matrix, parse failures (judged None: counted, never scored 0), per-category accuracy, and a score
histogram per label (PNG). Everything goes to MLflow and to --out; the last stdout line is the metrics as JSON.

    python jobs/validate_judge.py                                   # shipped vegetarian set, CPU default reward
    python jobs/validate_judge.py --data my_labels.jsonl --reward-config jobs/configs/reward_judge_only.yaml
    python jobs/validate_judge.py reward.judge.mode=score data.limit=20
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rayalign import config as C  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ValidationData:
    path: str = "builtin:vegetarian/judge_validation"
    """Labelled rows (JSONL: prompt, response, label 1/0[, category]) or a shipped set builtin:<name>/<split>."""
    limit: int | None = None
    """Use at most this many rows (None: all)."""
    batch_size: int = 32
    """Rows judged per call."""


@dataclasses.dataclass(frozen=True)
class ValidateConfig:
    reward: C.RewardConfig = C.CPU_DEFAULT_REWARD
    """The reward under validation (default: the CPU default composite, SmolLM2 judge + vegetarian lexicon)."""
    data: ValidationData = ValidationData()
    """Which labelled rows."""
    out: str = "outputs/validate_judge"
    """Directory for results.jsonl, metrics.json and the histogram."""
    ray: C.RayConfig = C.RayConfig()
    """Which Ray."""
    tracking: C.TrackingConfig = C.TrackingConfig(experiment="rayalign-validate-judge")
    """Where results go."""

    def phases(self) -> list:
        """What runs at once (`rayalign.placement`)."""
        from rayalign import placement as P

        return [P.Phase("judging", tuple(P.reward(self.reward)))]


def read_rows(name: str, limit: int | None) -> tuple[list[dict], int]:
    from rayalign.data.prompts import DatasetError, dataset_path

    path = dataset_path(name)
    if not path.is_file():
        raise DatasetError(f"{name}: validation file not found")
    rows, skipped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str)
                and row.get("label") in (0, 1) and not isinstance(row.get("label"), bool)):
            skipped += 1
            continue
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise DatasetError(f"{name}: no usable rows (need prompt, response and label 0/1; {skipped} skipped)")
    return rows, skipped


def histogram(results: list[dict], threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, color, name in ((1, "tab:green", "good (label 1)"), (0, "tab:red", "bad (label 0)")):
        scores = [r["score"] for r in results if r["label"] == label and r["score"] is not None]
        ax.hist(scores, bins=20, range=(0, 1), alpha=0.6, color=color, label=name)
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold}")
    ax.set_xlabel("score")
    ax.set_ylabel("rows")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from rayalign.job import INPUT_ERRORS, refuse, start_ray

    args = list(sys.argv[1:] if argv is None else argv)
    reward_file, rest = None, []
    while args:
        arg = args.pop(0)
        if arg in ("--data", "--reward-config", "--out"):
            if not args:
                return refuse(f"command line: {arg} needs a value", "config error")
            value = args.pop(0)
            if arg == "--data":
                rest.append(f"data.path={value}")
            elif arg == "--out":
                rest.append(f"out={value}")
            else:
                reward_file = value
        else:
            rest.append(arg)
    cfg = C.parse_job_config(ValidateConfig, rest, description=__doc__ or "")
    if reward_file is not None:
        reward_overrides = [o.removeprefix("reward.") for o in rest if o.startswith("reward.")]
        try:
            cfg = dataclasses.replace(cfg, reward=C.load_config(C.RewardConfig, reward_file, reward_overrides))
        except C.ConfigError as e:
            return refuse(e, "config error")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from rayalign.judge.reward import build_reward, uses_ray
    from rayalign.judge.rubric import load_rubric, rubric_path

    try:
        rows, skipped = read_rows(cfg.data.path, cfg.data.limit)
        rubric = load_rubric(rubric_path(cfg.reward.judge.rubric))
        reward = build_reward(cfg.reward)  # starts nothing yet
    except INPUT_ERRORS as e:
        return refuse(e)

    from tqdm.auto import tqdm

    from rayalign.evaluation.metrics import binary_metrics, roc_auc
    from rayalign.judge.openai_judge import JudgeUnavailableError
    from rayalign.tracking import Tracker

    if uses_ray(cfg.reward):  # the Serve judge and reward-model actors
        try:
            start_ray(cfg.ray, cfg.phases())
        except C.ConfigError as e:
            return refuse(e, "config error")
    out = Path(cfg.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    status = 0
    with Tracker(cfg.tracking.experiment, run_name=cfg.tracking.run_name, config=cfg,
                 tags={"job": "validate_judge"}) as tracker:
        t0 = time.perf_counter()
        try:
            for start in tqdm(range(0, len(rows), cfg.data.batch_size), desc="judging", unit="batch"):
                batch = rows[start:start + cfg.data.batch_size]
                judgements = reward([r["prompt"] for r in batch], [r["response"] for r in batch])
                for row, j in zip(batch, judgements):
                    results.append({**row, "score": j.score, "reward": j.reward, "error": j.error,
                                    "components": dict(j.components), "judge_raw": j.raw[:300]})
        except JudgeUnavailableError as e:
            print(f"error: {e} -- {len(results)} rows judged before that are saved in {out}", file=sys.stderr)
            status = 1
        finally:
            reward.shutdown()
        seconds = time.perf_counter() - t0
        with open(out / "results.jsonl", "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
        judged = [r for r in results if r["score"] is not None]
        metrics: dict = binary_metrics([r["label"] for r in judged],
                                       [int(r["score"] >= rubric.threshold) for r in judged])
        metrics["auc"] = roc_auc([r["label"] for r in judged], [r["score"] for r in judged])
        metrics.update(rows=len(rows), skipped_rows=skipped, judged=len(judged),
                       parse_failures=len(results) - len(judged), threshold=rubric.threshold,
                       seconds=round(seconds, 2),
                       components=[c.name for c in cfg.reward.components] or ["judge"])
        categories = sorted({r.get("category") for r in judged if r.get("category")})
        metrics["accuracy_by_category"] = {
            c: round(sum(int(r["score"] >= rubric.threshold) == r["label"] for r in judged if r.get("category") == c)
                     / sum(1 for r in judged if r.get("category") == c), 3) for c in categories}
        histogram(results, rubric.threshold, out / "score_histogram.png")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=0)
        tracker.log_artifact(out)
        metrics["mlflow_run_id"] = tracker.run_id
        metrics["out"] = str(out)
    print(f"accuracy {metrics['accuracy']:.3f}, F1 {metrics['f1']:.3f} on {len(judged)} rows "
          f"({metrics['parse_failures']} parse failures); details in {out}")
    print(json.dumps(metrics))
    return status


if __name__ == "__main__":
    sys.exit(main())
