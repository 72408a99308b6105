"""jobs/sample.py end to end: real SmolLM2 on the CPU vLLM build in a Ray actor, results in MLflow."""

from __future__ import annotations

import json

import pytest

from conftest import run_job


@pytest.mark.slow
def test_sample_job_end_to_end(tmp_path, model_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_job(
        "sample.py", "data.limit=3", "sampling.max_new_tokens=12", "sampling.temperature=0", "ray.num_cpus=2",
        cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}, timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "3 samples from smollm2-135m-instruct" in result.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    [experiment] = [e for e in client.search_experiments() if e.name == "rayalign-sample"]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["num_samples"] == 3
    assert run.data.metrics["output_tokens_per_second"] > 0
    assert run.data.params["model.name"] == "smollm2-135m-instruct"
    table = json.loads(open(client.download_artifacts(run.info.run_id, "samples.json", str(tmp_path))).read())
    responses = [row[table["columns"].index("response")] for row in table["data"]]
    assert len(responses) == 3 and all(r.strip() for r in responses)
