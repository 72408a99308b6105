"""Held-out evaluation: the base model against one or more aligned models, judged by the rubric's LLM judge.

Each model answers every held-out prompt (greedy by default, so a rerun gives the same answers). One vLLM engine
with LoRA enabled serves the base and every adapter in turn (each adapter is published as a new version and the
engine syncs to it); a merged model gets its own engine. Then the judge (vLLM on Ray Serve, or any
OpenAI-compatible endpoint) scores each response, and compares each aligned model's answer with the base's in
both orders (win rate, position bias cancelled). The report, per model: violations (judge score below the
rubric's threshold) as count and rate, failed judgements apart (never 0, never a violation), mean score and its
distribution, mean response length, and a second, non-LLM estimate of violations from a rule (the vegetarian
lexicon by default); per aligned model its win rate against the base; and side-by-side samples where the models
differ most. Written to ``out`` (report.json, report.md, samples.jsonl, PNGs), logged to MLflow (experiment
``rayalign-eval``); the headline table is printed.

Departure from the source material: there the 70B judge counted non-vegetarian answers (43 of 100 held-out
prompts before alignment, 30 after); here a violation is a judge score below the rubric's threshold, with the
rule's count beside it, since a small judge cannot be trusted alone (see README, "The judge, validated").

``--model`` (repeatable) takes an HF model directory (a merged model), a peft adapter directory
(adapter_config.json) or the MLflow run id of a ``jobs/ppo.py`` run (its ``model/adapter`` artifact, else
``model/merged``). Without ``--model`` the base is evaluated alone. The base is ``model.name``.

    python jobs/evaluate.py                                   # the embedded SmolLM2 on the 120 held-out prompts
    python jobs/evaluate.py --model outputs/<run>/adapter --model <mlflow run id>
    python jobs/evaluate.py --prompts my_holdout.jsonl --model <run id> judge.mode=logprob data.limit=50
    python jobs/evaluate.py --model <run id> judge.backend=openai judge.url=http://host:8000/v1 judge.endpoint_model=m
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rayalign import config as C  # noqa: E402

log = logging.getLogger("rayalign.evaluate")


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    rule: str = "vegetarian_lexicon"
    """Rule from rayalign.judge.rules giving the second, non-LLM violation estimate (empty: none)."""
    samples: int = 5
    """Side-by-side samples per aligned model (the prompts with the largest score gap)."""
    bins: int = 10
    """Bins of the score histograms over [0, 1]."""

    def validate(self) -> None:
        from rayalign.judge.rules import RULES

        if self.rule and self.rule not in RULES:
            raise C.ConfigError(f"report.rule: unknown rule '{self.rule}' (known: {', '.join(sorted(RULES))})")
        C.require_at_least("report.samples", self.samples, 0)
        C.require_at_least("report.bins", self.bins, 1)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    model: C.ModelConfig = C.ModelConfig()
    """The base model (adapters are applied on top of it)."""
    models: tuple[str, ...] = ()
    """Aligned models: HF directories, peft adapter directories or MLflow run ids (--model adds to this)."""
    engine: C.EngineConfig = C.EngineConfig()
    """vLLM engines for generation."""
    sampling: C.SamplingConfig = C.SamplingConfig(temperature=0.0, max_new_tokens=128, seed=0)
    """How answers are generated (greedy by default: reproducible)."""
    judge: C.JudgeConfig = C.JudgeConfig()
    """The LLM judge and its rubric (the rubric's threshold separates violations from passes)."""
    data: C.DataConfig = C.DataConfig(prompts="builtin:vegetarian/holdout")
    """Which prompts (--prompts sets data.prompts)."""
    report: ReportConfig = ReportConfig()
    """What the report holds."""
    out: str = ""
    """Output directory (empty: ./eval/<date>-<time>)."""
    ray: C.RayConfig = C.RayConfig(num_cpus=4)
    """Which Ray. Generation and judging take turns, so the local default's 4 logical CPUs may exceed the cores."""
    tracking: C.TrackingConfig = C.TrackingConfig(experiment="rayalign-eval")
    """Where results go."""

    def phases(self) -> list:
        """What runs at once (`rayalign.placement`): generation, then judging (the engines are shut down first)."""
        from rayalign import placement as P

        return [P.Phase("generation", tuple(P.engines(self.engine))), P.Phase("judging", tuple(P.judge(self.judge)))]

    def validate(self) -> None:
        if self.sampling.n != 1:
            raise C.ConfigError(f"sampling.n: evaluation takes one answer per prompt, got {self.sampling.n}")


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull ``--prompts``, ``--model`` (repeatable) and ``--out`` out of argv: (config args, models)."""
    rest, models = [], []
    args = list(argv)
    while args:
        arg = args.pop(0)
        name, eq, value = arg.partition("=")
        if name in ("--prompts", "--model", "--out"):
            if not eq:
                if not args:
                    raise C.ConfigError(f"{name} needs a value")
                value = args.pop(0)
            if name == "--model":
                models.append(value)
            else:
                rest.append(f"{'data.prompts' if name == '--prompts' else 'out'}={value}")
        else:
            rest.append(arg)
    return rest, models


def main(argv: list[str] | None = None) -> int:
    from rayalign.job import INPUT_ERRORS, load_job_inputs, prompt_token_budget, refuse, start_ray

    try:
        args, model_specs = split_argv(list(sys.argv[1:] if argv is None else argv))
    except C.ConfigError as e:
        return refuse(f"command line: {e}", "config error")
    cfg = C.parse_job_config(EvalConfig, args, description=__doc__ or "")
    if model_specs:
        cfg = dataclasses.replace(cfg, models=tuple(model_specs))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from rayalign.evaluation.generation import unique_labels
    from rayalign.judge.rubric import load_rubric, rubric_path
    from rayalign.models import ResolvedModel, resolve_model_spec

    downloads = tempfile.TemporaryDirectory(prefix="rayalign-eval-models-")
    try:
        inputs = load_job_inputs(cfg.model.name, cfg.data, prompt_token_budget(cfg.engine, cfg.sampling))
        rubric = load_rubric(rubric_path(cfg.judge.rubric))
        candidates = unique_labels([resolve_model_spec(s, Path(downloads.name), what=f"--model {s}")
                                    for s in cfg.models])
    except INPUT_ERRORS as e:
        return refuse(e)
    dataset, prompts = inputs.prompts, list(inputs.prompts.prompts)
    base = ResolvedModel("base", inputs.model_path, "base", cfg.model.name)
    for c in candidates:
        if c.kind == "adapter" and c.trained_on_other_base(base.path):
            log.warning("%s was trained on %s but is evaluated on the base %s (model.name)", c.label,
                        c.adapter_base, base.path)

    import ray

    from rayalign.evaluation import report as R
    from rayalign.evaluation.generation import generate_all
    from rayalign.judge.openai_judge import JudgeUnavailableError
    from rayalign.judge.pairwise import win_rate
    from rayalign.judge.reward import build_judge
    from rayalign.tracking import Tracker

    try:  # generation and judging take turns: each must fit on its own
        address = start_ray(cfg.ray, cfg.phases())
    except C.ConfigError as e:
        return refuse(e, "config error")
    out = Path(cfg.out or f"eval/{time.strftime('%Y%m%d-%H%M%S')}").expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    log.info("evaluating %s on %d prompts from %s; report in %s",
             ", ".join(c.label for c in [base, *candidates]), len(prompts), dataset.source, out)
    tags = {"job": "evaluate", "ray_address": address,
            **{f"model.{c.label}": c.run_id or c.path for c in candidates}}
    with Tracker(cfg.tracking.experiment, run_name=cfg.tracking.run_name, config=cfg, tags=tags) as tracker:
        # -- generate: every model answers every prompt; engines are gone before the judge starts ------------
        rollouts, times = generate_all(base, candidates, prompts, cfg.model, cfg.engine, cfg.sampling)
        downloads.cleanup()
        responses = {label: [r.response for r in rs] for label, rs in rollouts.items()}

        # -- judge: scores per response, then each aligned model against the base in both orders -------------
        t0 = time.perf_counter()
        judge = build_judge(cfg.judge)
        times["time/judge_start"] = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            judgements = {label: judge.judge(prompts, rs) for label, rs in responses.items()}
            times["time/judge"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            pairwise = {c.label: win_rate(judge.compare, prompts, responses[c.label], responses["base"])
                        for c in candidates}
            times["time/pairwise"] = time.perf_counter() - t0
        except JudgeUnavailableError as e:
            print(f"error: {e}", file=sys.stderr)
            tracker.end("FAILED")
            ray.shutdown()
            return 1
        finally:
            judge.shutdown()
        rule_scores = R.score_by_rule(cfg.report.rule, prompts, responses)

        # -- report ------------------------------------------------------------------------------------------
        answers = {label: R.answers(rs) for label, rs in rollouts.items()}
        models = R.summarize_models([{"label": c.label, "kind": c.kind, "source": c.source, "run_id": c.run_id}
                                     for c in [base, *candidates]], answers, judgements, rule_scores,
                                    rubric.threshold, cfg.report.bins)
        samples = [s for c in candidates
                   for s in R.side_by_side(prompts, "base", c.label, responses, judgements, rule_scores,
                                           pairwise[c.label].outcomes, rubric.threshold, cfg.report.samples)]
        report = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "data": {"source": dataset.source, "prompts": len(prompts), "skipped_rows": dataset.skipped},
            "judge": {"backend": cfg.judge.backend, "model": cfg.judge.model if cfg.judge.backend != "openai"
                      else cfg.judge.endpoint_model, "mode": cfg.judge.mode, "rubric": rubric.name,
                      "threshold": rubric.threshold},
            "rule": cfg.report.rule or None,
            "sampling": C.to_dict(cfg.sampling),
            "models": models,
            "pairwise": [{"model": label, "baseline": "base", **w.as_dict()} for label, w in pairwise.items()],
            "samples": samples,
            "times": {k: round(v, 2) for k, v in times.items()},
            "mlflow_run_id": tracker.run_id,
        }
        problems = R.check_report(report)
        if problems:
            raise RuntimeError("inconsistent report: " + "; ".join(problems))
        images = R.plot(report, out)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "report.md").write_text(R.render_markdown(report, images))
        R.write_samples(out / "samples.jsonl", prompts, answers, judgements, rule_scores)
        tracker.log_metrics({**times, **R.flat_metrics(report)}, step=0)
        tracker.log_artifact(out)

    print("\n" + R.text_table(report))
    if report["pairwise"]:
        print("\n" + R.win_rate_table(report))
    print(f"\nreport: {out / 'report.md'} (MLflow run {tracker.run_id} at {C.redact_url(tracker.uri)})")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
