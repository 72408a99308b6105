"""jobs/dpo.py end to end on the real SmolLM2: the Ray Train + DeepSpeed learner with the DPO and KTO objectives,
MLflow, checkpoints, exact resume, and the saved model handed to the evaluation code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, load_job, run_job

pytestmark = pytest.mark.slow

SMALL = ["data.limit=24", "algorithm.minibatch_size=4", "learner.micro_batch_size=2", "data.max_length=256",
         "heldout.enabled=false"]


def _runs(cwd: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rayalign-dpo")
    return client, client.search_runs([exp.experiment_id])


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


@pytest.mark.long  # three runs; exact resume stays in CI through jobs/ppo.py's test
def test_dpo_two_steps_then_killed_and_resumed_exactly(tmp_path):
    args = [*SMALL, "trainer.checkpoint_every=1", "trainer.eval_every=2", "trainer.run_name=dpo-run",
            "trainer.total_steps=3"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "dpo.py"), *args], cwd=tmp_path, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while "step 2/3" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.time() < deadline, "no step 2 within 10 minutes"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first_log = log_path.read_text()
    assert "skipped" in first_log

    resumed = run_job("dpo.py", *args[:-2], "trainer.run_name=dpo-run", "trainer.resume=true", "trainer.total_steps=3",
                      cwd=tmp_path, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "dpo: loss" in resumed.stdout and "MLflow run" in resumed.stdout

    client, runs = _runs(tmp_path)
    (run,) = runs  # the resumed job continues the same MLflow run
    run_id = run.info.run_id
    for key in ("train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/accuracy",
                "train/rewards/margin", "train/logps/chosen", "train/logps/rejected", "tokens_per_second"):
        steps = [s for s, _ in _history(client, run_id, key)]
        assert set(steps) == {1, 2, 3}, (key, steps)  # step 2 may be logged twice: before the kill and after
    assert 3 in {s for s, _ in _history(client, run_id, "eval/loss")}  # (step 2's eval may have been killed)
    assert run.data.metrics["learner/trainable_params"] > 0
    state = json.loads((tmp_path / "checkpoints" / "dpo-run" / "checkpoint_000003" / "driver_state.json").read_text())
    assert state["step"] == 3 and state["mlflow_run_id"] == run_id

    # the same steps without the kill: the resumed run trained on the same rows from the same weights
    straight = run_job("dpo.py", *SMALL, "trainer.checkpoint_every=0", "trainer.eval_every=0",
                       "trainer.run_name=straight", "trainer.total_steps=3", cwd=tmp_path, timeout=900)
    assert straight.returncode == 0, straight.stderr[-4000:]
    client, runs = _runs(tmp_path)
    (other,) = [r for r in runs if r.info.run_id != run_id]
    resumed_losses = dict(_history(client, run_id, "train/loss"))
    straight_losses = dict(_history(client, other.info.run_id, "train/loss"))
    for step in (1, 2, 3):
        assert resumed_losses[step] == pytest.approx(straight_losses[step], abs=1e-5), step
    # a step moved the policy: after the first update the chosen answers' implicit rewards lead on average
    assert straight_losses[3] != straight_losses[1]

    artifacts = {a.path for a in client.list_artifacts(run_id, "model")}
    assert {"model/adapter", "model/merged"} <= artifacts


@pytest.mark.long  # KTO's loss is unit-tested; the job path is the DPO test's
def test_kto_two_steps(tmp_path):
    result = run_job("dpo.py", *SMALL, "algorithm.name=kto", "data.train=builtin:vegetarian/kto",
                     "trainer.total_steps=2", "trainer.eval_every=1", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    client, (run,) = _runs(tmp_path)
    for key in ("train/loss", "train/rewards/desirable", "train/rewards/undesirable", "train/kl", "eval/loss"):
        assert [s for s, _ in _history(client, run.info.run_id, key)] == [1, 2], key
    assert (tmp_path / "checkpoints").is_dir()


def test_bad_data_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n")
    result = run_job("dpo.py", f"data.train={bad}", cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (f"error: {bad}: no usable preference pairs (1 identical "
                                                      "chosen and rejected)")


def test_reward_accuracy_rises_and_the_run_id_resolves_for_serve_and_evaluate(tmp_path, monkeypatch, model_path):
    """Three steps on the same four pairs (one minibatch an epoch), evaluated on those pairs: the step-1 margins
    are exactly 0 (the policy is its reference), then accuracy and margin rise; serve and evaluate take the run
    id and find the adapter on the base this run trained."""
    from rayalign.data.preferences import load_preferences
    from rayalign.models import resolve_model_spec

    pairs = load_preferences("builtin:vegetarian/pairs", limit=4).examples
    data = tmp_path / "four.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt[-1][1], "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in pairs))
    result = run_job("dpo.py", f"data.train={data}", f"data.eval={data}", "algorithm.minibatch_size=4",
                     "learner.micro_batch_size=2", "trainer.total_steps=3", "trainer.eval_every=0",
                     "trainer.checkpoint_every=0", "heldout.enabled=false", "trainer.run_name=four", cwd=tmp_path,
                     timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    client, (run,) = _runs(tmp_path)
    run_id = run.info.run_id
    accuracy = dict(_history(client, run_id, "train/rewards/accuracy"))
    margin = dict(_history(client, run_id, "train/rewards/margin"))
    assert margin[1] == pytest.approx(0.0, abs=1e-6) and accuracy[1] == 0.0
    assert margin[1] < margin[2] < margin[3] and accuracy[3] > accuracy[1], (accuracy, margin)
    assert dict(_history(client, run_id, "eval/rewards/accuracy"))[3] >= accuracy[3]  # after the third update
    assert dict(_history(client, run_id, "eval/rewards/margin"))[3] > margin[3]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    serve = load_job("serve.py")
    served = serve.resolve_served(serve.ServeJobConfig(serve=serve.ServeConfig(run_id=run_id)), tmp_path / "dl")
    assert served.adapter is not None and (served.adapter / "adapter_config.json").is_file()
    assert (served.model_path, served.lora_rank, served.name) == (model_path, 16, "four")
    evaluated = resolve_model_spec(run_id, tmp_path / "dl2", what="--model")
    assert (evaluated.kind, evaluated.run_id, evaluated.run_model_name) == ("adapter", run_id, "smollm2-135m-instruct")
    assert not evaluated.trained_on_other_base(model_path)
