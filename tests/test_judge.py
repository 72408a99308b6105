"""The judge for real: SmolLM2 on the CPU vLLM build inside a Ray Serve deployment, and validate_judge.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_job
from rayalign.config import JudgeConfig

pytestmark = pytest.mark.slow

PAIRS = [("What protein can I add to a salad?", "Chickpeas, lentils or a boiled egg all work well."),
         ("What protein can I add to a salad?", "Grilled chicken or tuna."),
         ("How do I make soup richer?", "Simmer it in beef stock."),
         ("How do I make soup richer?", "Blend in white beans and finish with a knob of butter.")]


@pytest.fixture(scope="module")
def serve_judge(local_ray, model_path):
    from rayalign.judge.vllm_judge import ServeJudge

    # float32: in bfloat16, P(yes) moves by ~0.03 with the batch a request lands in (batch-shape numerics)
    judge = ServeJudge(model_path, JudgeConfig(mode="logprob", dtype="float32", max_batch_size=8))
    yield judge
    judge.shutdown()


def test_serve_judge_scores_a_batch(serve_judge):
    import math

    out = serve_judge.judge([p for p, _ in PAIRS], [r for _, r in PAIRS])
    assert len(out) == 4
    for j in out:
        assert j.ok and 0 < j.score < 1, j  # logprob mode always yields P(yes) over the two allowed answers
        assert j.reward == pytest.approx(math.log(min(max(j.score, 0.01), 0.99) / (1 - min(max(j.score, 0.01), 0.99))))
        assert "yes" in j.raw.lower() or "no" in j.raw.lower()


def test_one_sample_too_long_for_the_judge_fails_alone(serve_judge):
    prompts = [p for p, _ in PAIRS[:2]] * 2
    responses = [r for _, r in PAIRS[:2]] + ["lentils " * 2000, PAIRS[0][1]]
    out = serve_judge.judge(prompts, responses)
    assert [j.ok for j in out] == [True, True, False, True]
    assert "longer than the judge's context" in out[2].error and out[2].reward is None


def test_serve_batching_and_unbatched_routes_agree(serve_judge):
    handle = serve_judge.handle
    batched = [handle.judge.remote(pair) for pair in PAIRS]  # concurrent requests, gathered by @serve.batch
    single = [handle.judge_unbatched.remote(pair) for pair in PAIRS]
    a = [r.result(timeout_s=300).score for r in batched]
    b = [r.result(timeout_s=300).score for r in single]
    assert a == pytest.approx(b, abs=0.02)


@pytest.mark.long  # the validate job's own start
def test_validate_judge_job_on_a_slice(tmp_path):
    from rayalign.data.prompts import dataset_path

    rows = [json.loads(line) for line in dataset_path("builtin:vegetarian/judge_validation").open()]
    good = [r for r in rows if r["label"] == 1][:4]
    bad = [r for r in rows if r["label"] == 0][:4]
    data = tmp_path / "slice.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in good + bad) + "not json\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_job("validate_judge.py", "--data", str(data), "--out", str(tmp_path / "out"), "ray.num_cpus=2",
                     cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}, timeout=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["rows"] == 8 and metrics["skipped_rows"] == 1
    assert metrics["tp"] + metrics["fp"] + metrics["tn"] + metrics["fn"] + metrics["parse_failures"] == 8
    assert metrics["components"] == ["judge", "lexicon"] and 0 <= metrics["auc"] <= 1
    run_dir = Path(metrics["out"])  # absolute: --out was
    assert (run_dir / "score_histogram.png").stat().st_size > 1000
    assert len((run_dir / "results.jsonl").read_text().splitlines()) == 8

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.data.metrics["accuracy"] == pytest.approx(metrics["accuracy"])


def test_the_judge_as_a_ray_serve_llm_app_scores_like_rayalign_s_deployment(serve_judge, local_ray):
    """judge.backend=ray_serve_llm: the same model, rubric and mode behind ray.serve.llm's OpenAI routes give the
    same P(yes) as rayalign's own deployment (float32 both), and a failed start is one line."""
    from rayalign.judge.reward import build_judge

    config = JudgeConfig(backend="ray_serve_llm", mode="logprob", dtype="float32", max_batch_size=8)
    judge = build_judge(config)
    try:
        assert judge.start_seconds is not None and judge.start_seconds > 0
        theirs = judge.judge([p for p, _ in PAIRS], [r for _, r in PAIRS])
    finally:
        judge.shutdown()
    ours = serve_judge.judge([p for p, _ in PAIRS], [r for _, r in PAIRS])
    assert all(j.ok for j in theirs), theirs
    assert [j.score for j in theirs] == pytest.approx([j.score for j in ours], abs=0.05)
