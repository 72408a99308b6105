"""jobs/sft.py end to end on the real SmolLM2: packed rows on the Ray Train + DeepSpeed learner, MLflow, checkpoints,
exact resume, and a merged model that the next job takes as its model.name."""

from __future__ import annotations

import json

import pytest

from conftest import run_job

pytestmark = pytest.mark.slow

SMALL = ["data.limit=24", "algorithm.minibatch_size=2", "heldout.enabled=false"]


def _runs(cwd):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rayalign-sft")
    return client, {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def _history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_sft_two_packed_steps_resume_exactly_and_the_merged_model_is_a_model_name(tmp_path):
    first = run_job("sft.py", *SMALL, "trainer.total_steps=2", "trainer.checkpoint_every=1", "trainer.eval_every=1",
                    "trainer.run_name=first", "tracking.run_name=first", cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "sft: loss" in first.stdout and "eval loss" in first.stdout
    client, runs = _runs(tmp_path)
    run = runs["first"]
    for key in ("train/loss", "tokens_per_second", "eval/loss", "eval/perplexity"):
        assert set(_history(client, run.info.run_id, key)) == {1, 2}, key
    metrics = run.data.metrics
    assert metrics["data/train_examples"] > metrics["data/train_rows"]  # several examples share a packed row
    assert 0.5 < metrics["data/pack_fill"] <= 1.0
    for step in (1, 2):
        state = json.loads((tmp_path / "checkpoints" / "first" / f"checkpoint_00000{step}" /
                            "driver_state.json").read_text())
        assert state["step"] == step and state["mlflow_run_id"] == run.info.run_id

    # a new run from the first step's checkpoint trains step 2 on the same rows from the same weights
    resumed = run_job("sft.py", *SMALL, "trainer.total_steps=2", "trainer.eval_every=0",
                      "trainer.resume_from=checkpoints/first/checkpoint_000001", "trainer.run_name=second",
                      "tracking.run_name=second", cwd=tmp_path, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    client, runs = _runs(tmp_path)
    straight = _history(client, run.info.run_id, "train/loss")
    again = _history(client, runs["second"].info.run_id, "train/loss")
    assert set(again) == {2} and again[2] == pytest.approx(straight[2], abs=1e-5)
    assert straight[2] != straight[1]

    merged = tmp_path / "outputs" / "first" / "merged"
    assert (tmp_path / "outputs" / "first" / "adapter" / "adapter_config.json").is_file()
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    from rayalign.job import load_job_inputs

    assert load_job_inputs(str(merged), None, None).model_path == str(merged)  # model.name of ppo.py / dpo.py


def test_sft_bad_rows_are_counted_and_nothing_usable_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "completion": ""}) + "\n" + "{oops\n")
    result = run_job("sft.py", f"data.train={bad}", "data.response_column=completion", cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (f"error: {bad}: no usable (prompt, completion) rows "
                                                      "(1 empty response, 1 unparsable line)")
