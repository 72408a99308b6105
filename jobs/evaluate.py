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
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rayalign import config as C  # noqa: E402

log = logging.getLogger("rayalign.evaluate")

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM accepts as max_lora_rank


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

    def validate(self) -> None:
        if self.sampling.n != 1:
            raise C.ConfigError(f"sampling.n: evaluation takes one answer per prompt, got {self.sampling.n}")


@dataclasses.dataclass(frozen=True)
class Candidate:
    label: str
    kind: str
    """"base", "adapter" (peft, applied to the base) or "merged" (a whole HF model)."""
    source: str
    """What the user gave (path or run id)."""
    path: str
    run_id: str | None = None
    lora_rank: int = 0


class InputError(ValueError):
    """Bad input from the command line: exit 2 with this one line."""


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
                    raise InputError(f"{name} needs a value")
                value = args.pop(0)
            if name == "--model":
                models.append(value)
            else:
                rest.append(f"{'data.prompts' if name == '--prompts' else 'out'}={value}")
        else:
            rest.append(arg)
    return rest, models


def resolve_candidate(spec: str, download_dir: Path) -> Candidate:
    """A --model value -> what to evaluate. Raises InputError with one line when it cannot be used."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"--model {spec}: not a directory (expected an HF model or a peft adapter directory)")
        name = f"{path.resolve().parent.name}-{path.name}" if path.name in ("adapter", "merged") else path.name
        if (path / "adapter_config.json").is_file():
            try:
                rank = int(json.loads((path / "adapter_config.json").read_text())["r"])
            except (ValueError, KeyError, TypeError) as e:
                raise InputError(f"--model {spec}: unreadable adapter_config.json ({type(e).__name__}: {e})") from None
            if not any((path / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
                raise InputError(f"--model {spec}: peft adapter directory without adapter_model.safetensors")
            if rank > VLLM_LORA_RANKS[-1]:
                raise InputError(f"--model {spec}: LoRA rank {rank} is above vLLM's limit {VLLM_LORA_RANKS[-1]}")
            return Candidate(name, "adapter", spec, str(path.resolve()), lora_rank=rank)
        if (path / "config.json").is_file():
            return Candidate(name, "merged", spec, str(path.resolve()))
        raise InputError(f"--model {spec}: neither an HF model (config.json) nor a peft adapter "
                         "(adapter_config.json)")
    run_id = spec.removeprefix("runs:/").strip("/")
    if not re.fullmatch(r"[0-9a-f]{32}", run_id):
        raise InputError(f"--model {spec}: no such directory, and not an MLflow run id")
    return _from_mlflow_run(spec, run_id, download_dir)


def _from_mlflow_run(spec: str, run_id: str, download_dir: Path) -> Candidate:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from rayalign.tracking import tracking_uri

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise InputError(f"--model {spec}: no MLflow run {run_id}: the tracking store {C.redact_url(uri)} "
                         f"does not exist")
    client = MlflowClient(uri)
    try:
        client.get_run(run_id)
        found = {f.path for f in client.list_artifacts(run_id, "model")}
    except MlflowException as e:
        raise InputError(f"--model {spec}: no MLflow run {run_id} in {uri} ({e.error_code})") from None
    for kind in ("adapter", "merged"):  # the adapter first: one engine serves it beside the base
        if f"model/{kind}" in found:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"model/{kind}",
                                                        dst_path=str(download_dir / run_id), tracking_uri=uri)
            candidate = resolve_candidate(local, download_dir)
            return dataclasses.replace(candidate, label=f"run-{run_id[:8]}", source=spec, run_id=run_id)
    raise InputError(f"--model {spec}: MLflow run {run_id} has no model artifacts (model/adapter or model/merged)")


def unique_labels(candidates: list[Candidate]) -> list[Candidate]:
    """Labels safe for MLflow metric names and distinct from each other and from "base"."""
    seen, out = {"base"}, []
    for c in candidates:
        label = re.sub(r"[^A-Za-z0-9_.-]+", "_", c.label) or "model"
        unique, k = label, 2
        while unique in seen:
            unique, k = f"{label}-{k}", k + 1
        seen.add(unique)
        out.append(dataclasses.replace(c, label=unique))
    return out


def generate_all(cfg: EvalConfig, base: Candidate, candidates: list[Candidate], prompts: list[str],
                 times: dict[str, float]) -> dict[str, list]:
    """Rollouts per label: the base and every adapter on one LoRA engine group, each merged model on its own."""
    from rayalign.rollout.group import RolloutGroup
    from rayalign.rollout.weight_sync import lora_payload

    adapters = [c for c in candidates if c.kind == "adapter"]
    rank = min(r for r in VLLM_LORA_RANKS if r >= max([c.lora_rank for c in adapters], default=1))
    rollouts = {}
    t0 = time.perf_counter()
    group = RolloutGroup(base.path, cfg.model, cfg.engine, transport="lora" if adapters else "none",
                         max_lora_rank=rank, name="eval")
    times["time/engine_start"] = time.perf_counter() - t0
    try:
        for c in [base, *adapters]:
            t0 = time.perf_counter()
            if c.kind == "adapter":
                group.publish(lora_payload(group.next_version(), c.path))
                group.sync()
            rollouts[c.label] = group.generate(prompts, cfg.sampling)
            times[f"time/generate/{c.label}"] = time.perf_counter() - t0
    finally:
        group.shutdown()
    for c in (c for c in candidates if c.kind == "merged"):
        t0 = time.perf_counter()
        group = RolloutGroup(c.path, dataclasses.replace(cfg.model, name=c.path), cfg.engine, transport="none",
                             name="eval-merged")
        try:
            rollouts[c.label] = group.generate(prompts, cfg.sampling)
        finally:
            group.shutdown()
        times[f"time/generate/{c.label}"] = time.perf_counter() - t0
    return rollouts


def side_by_side(prompts: list[str], baseline: str, label: str, responses: dict, judgements: dict,
                 rule_scores: dict, outcomes: tuple[str, ...], threshold: float, top: int) -> list[dict]:
    """The ``top`` prompts where ``label``'s answers differ most from ``baseline``'s, both answers beside each other."""
    from rayalign.evaluation.report import largest_gaps

    base_scores = [j.score for j in judgements[baseline]]
    scores = [j.score for j in judgements[label]]

    def side(name: str, i: int) -> dict:
        rule = rule_scores[name]
        return {"response": responses[name][i], "score": judgements[name][i].score,
                "judge_raw": judgements[name][i].raw[:200],
                "rule_violation": None if rule is None else rule[i] < threshold}

    return [{"model": label, "baseline": baseline, "prompt": prompts[i], "pairwise": outcomes[i],
             "gap": None if scores[i] is None or base_scores[i] is None else scores[i] - base_scores[i],
             "base": side(baseline, i), "candidate": side(label, i)}
            for i in largest_gaps(base_scores, scores, responses[baseline], responses[label],
                                  rule_scores[baseline], rule_scores[label], top)]


def warn_if_other_base(candidate: Candidate, base_path: str) -> None:
    """An adapter trained on another base would be evaluated on the wrong weights without any error."""
    trained_on = json.loads((Path(candidate.path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if trained_on and Path(trained_on).expanduser().resolve() != Path(base_path).resolve() and trained_on != base_path:
        log.warning("%s was trained on %s but is evaluated on the base %s (model.name)", candidate.label,
                    trained_on, base_path)


def main(argv: list[str] | None = None) -> int:
    try:
        args, model_specs = split_argv(list(sys.argv[1:] if argv is None else argv))
    except InputError as e:
        print(f"config error: command line: {e}", file=sys.stderr)
        return 2
    cfg = C.parse_job_config(EvalConfig, args, description=__doc__ or "")
    if model_specs:
        cfg = dataclasses.replace(cfg, models=tuple(model_specs))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from transformers import AutoTokenizer

    from rayalign.data.prompts import DatasetError, fit_to_context, load_prompts
    from rayalign.judge.rubric import RubricError, load_rubric, rubric_path
    from rayalign.models import ModelNotFoundError, resolve_model

    downloads = tempfile.TemporaryDirectory(prefix="rayalign-eval-models-")
    try:
        dataset = load_prompts(cfg.data.prompts, limit=cfg.data.limit)
        rubric = load_rubric(rubric_path(cfg.judge.rubric))
        base = Candidate("base", "base", cfg.model.name, resolve_model(cfg.model.name))
        dataset = fit_to_context(dataset, AutoTokenizer.from_pretrained(base.path),
                                 cfg.engine.max_model_len - cfg.sampling.max_new_tokens)
        candidates = unique_labels([resolve_candidate(s, Path(downloads.name)) for s in cfg.models])
    except (DatasetError, RubricError, ModelNotFoundError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompts = list(dataset.prompts)
    for c in candidates:
        if c.kind == "adapter":
            warn_if_other_base(c, base.path)

    import ray

    from rayalign.evaluation import report as R
    from rayalign.judge.openai_judge import JudgeUnavailableError
    from rayalign.judge.pairwise import win_rate
    from rayalign.judge.reward import build_judge
    from rayalign.judge.rules import RULES
    from rayalign.resources import check_resources, init_ray
    from rayalign.tracking import Tracker

    address = init_ray(cfg.ray)
    judge_replicas = cfg.judge.max_replicas if cfg.judge.backend == "vllm" else 0
    try:  # generation and judging take turns: the larger of the two must fit
        check_resources({"CPU": max(cfg.engine.num_engines * cfg.engine.num_cpus,
                                    judge_replicas * cfg.judge.engine.num_cpus),
                         "GPU": max(cfg.engine.num_engines * cfg.engine.num_gpus,
                                    judge_replicas * cfg.judge.engine.num_gpus)}, address)
    except C.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        ray.shutdown()
        return 2
    out = Path(cfg.out or f"eval/{time.strftime('%Y%m%d-%H%M%S')}").expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    log.info("evaluating %s on %d prompts from %s; report in %s",
             ", ".join(c.label for c in [base, *candidates]), len(prompts), dataset.source, out)
    tags = {"job": "evaluate", "ray_address": address,
            **{f"model.{c.label}": c.run_id or c.path for c in candidates}}
    times: dict[str, float] = {}
    with Tracker(cfg.tracking.experiment, run_name=cfg.tracking.run_name, config=cfg, tags=tags) as tracker:
        # -- generate: every model answers every prompt; engines are gone before the judge starts ------------
        rollouts = generate_all(cfg, base, candidates, prompts, times)
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
        rule = RULES[cfg.report.rule] if cfg.report.rule else None
        rule_scores = {label: [rule(p, r) for p, r in zip(prompts, rs)] if rule else None
                       for label, rs in responses.items()}

        # -- report ------------------------------------------------------------------------------------------
        models = []
        for c in [base, *candidates]:
            rs = rollouts[c.label]
            summary = R.model_summary([j.score for j in judgements[c.label]], rule_scores[c.label],
                                      [len(r.response_token_ids) for r in rs], [r.finish_reason for r in rs],
                                      rubric.threshold, cfg.report.bins)
            models.append({"label": c.label, "kind": c.kind, "source": c.source, "run_id": c.run_id, **summary})
        samples = []
        for c in candidates:
            samples += side_by_side(prompts, "base", c.label, responses, judgements, rule_scores,
                                    pairwise[c.label].outcomes, rubric.threshold, cfg.report.samples)
        report = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "data": {"source": dataset.source, "prompts": len(prompts), "skipped_rows": dataset.skipped},
            "judge": {"backend": cfg.judge.backend, "model": cfg.judge.model if cfg.judge.backend == "vllm"
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
        with open(out / "samples.jsonl", "w") as f:
            for i, prompt in enumerate(prompts):
                for label, rs in rollouts.items():
                    j = judgements[label][i]
                    f.write(json.dumps({"prompt": prompt, "model": label, "response": rs[i].response,
                                        "tokens": len(rs[i].response_token_ids), "finish_reason": rs[i].finish_reason,
                                        "score": j.score, "judge_raw": j.raw, "judge_error": j.error,
                                        "rule_score": None if rule is None else rule_scores[label][i]}) + "\n")
        tracker.log_metrics({**times, **R.flat_metrics(report)}, step=0)
        tracker.log_artifact(out)

    print("\n" + R.headline_table(report))
    if report["pairwise"]:
        print("\n" + R.win_rate_table(report))
    print(f"\nreport: {out / 'report.md'} (MLflow run {tracker.run_id} at {C.redact_url(tracker.uri)})")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
