"""The MLflow tracker writes a real run: params (secrets redacted), metrics per step, tables, status."""

from __future__ import annotations

import json

import pytest

from rayalign import config as C
from rayalign.tracking import Tracker, tracking_uri


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_default_uri_is_local(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_tracker_writes_a_run(store, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = C.load_config(C.TrackingConfig, None, ["run_name=unit"])
    secret = {"judge": {"api_key": "sk-123", "api_key_env": "JUDGE_KEY"}}
    with Tracker("unit-tests", run_name="unit", config=cfg) as tracker:
        tracker.log_config(secret)
        tracker.log_metrics({"reward/mean": 0.5, "kl": 0.01}, step=0)
        tracker.log_metrics({"reward/mean": 0.7, "bad": float("nan")}, step=1)
        tracker.log_table([{"prompt": "p", "response": "r", "score": 0.9}], "samples/step_0001.json")
        run_id = tracker.run_id

    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["experiment"] == "rayalign"
    assert run.data.params["judge.api_key"] == C.REDACTED
    assert run.data.params["judge.api_key_env"] == "JUDGE_KEY"
    history = [m.value for m in client.get_metric_history(run_id, "reward/mean")]
    assert history == [0.5, 0.7]
    assert "bad" not in run.data.metrics
    local = client.download_artifacts(run_id, "samples/step_0001.json", str(tmp_path))
    table = json.loads(open(local).read())
    assert table["columns"] == ["prompt", "response", "score"]
    config_text = open(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read()
    assert "sk-123" not in config_text


def test_failed_run_is_marked_failed(store):
    from mlflow.tracking import MlflowClient

    with pytest.raises(RuntimeError):
        with Tracker("unit-tests") as tracker:
            run_id = tracker.run_id
            raise RuntimeError("boom")
    assert MlflowClient(store).get_run(run_id).info.status == "FAILED"


def test_default_store_keeps_runs_and_artifacts_in_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with Tracker("unit-default-store") as tracker:
        tracker.log_text("hello", "notes/a.txt")
        artifact_dir = tracker.artifact_dir()
    assert (tmp_path / "mlflow.db").is_file()
    assert artifact_dir.startswith((tmp_path / "mlartifacts").as_uri())
    assert len(list((tmp_path / "mlartifacts").rglob("a.txt"))) == 1
