"""jobs/evaluate.py's input errors. The job itself runs end to end in tests/test_ppo_job.py, on the policy that
test trains (by its MLflow run id and as merged weights, against the base), so the suite pays for one evaluate run."""

from __future__ import annotations

import pytest

from conftest import run_job

pytestmark = pytest.mark.slow


def test_evaluate_missing_model_path_exits_2_with_one_line(tmp_path):
    result = run_job("evaluate.py", "--model", str(tmp_path / "no_such_model"), cwd=tmp_path,
                     env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --model {tmp_path / 'no_such_model'}: no such directory, and not an MLflow run id"]
