"""jobs/evaluate.py end to end: the embedded SmolLM2 against itself with a random LoRA adapter, on one LoRA vLLM
engine, judged by SmolLM2 on Ray Serve; one evaluate run (engine and judge starts dominate the time)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_job

pytestmark = pytest.mark.slow

N_PROMPTS = 8


def _random_adapter(model_path: str, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    return out


def test_evaluate_base_vs_random_adapter(tmp_path, model_path):
    from rayalign.data.prompts import load_prompts

    prompts = load_prompts("builtin:vegetarian/holdout", limit=N_PROMPTS).prompts
    data = tmp_path / "holdout.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    adapter = _random_adapter(model_path, tmp_path / "random_adapter")
    out = tmp_path / "report"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_job("evaluate.py", "--prompts", str(data), "--model", str(adapter), "--out", str(out),
                     cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1"}, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout[-2500:])  # the headline table, for the record (pytest -s)

    report = json.loads((out / "report.json").read_text())
    assert [m["label"] for m in report["models"]] == ["base", "random_adapter"]
    assert [m["kind"] for m in report["models"]] == ["base", "adapter"]
    for m in report["models"]:
        j = m["judge"]
        assert m["prompts"] == N_PROMPTS
        assert j["violations"] + j["passes"] + j["failures"] == N_PROMPTS
        assert sum(j["histogram"]["counts"]) == j["violations"] + j["passes"]
        assert 0 <= m["rule"]["violations"] <= N_PROMPTS and m["response_tokens_mean"] > 0
    [pair] = report["pairwise"]
    assert pair["model"] == "random_adapter" and pair["baseline"] == "base"
    assert pair["wins"] + pair["ties"] + pair["losses"] + pair["failed"] == N_PROMPTS
    assert pair["win_rate"] is None or 0 <= pair["win_rate"] <= 1
    assert 0 < len(report["samples"]) <= 5

    for name in ("score_histograms.png", "violations.png"):
        assert (out / name).stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "| random_adapter | adapter |" in md and "random_adapter vs base" in md and "## Side by side" in md
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * N_PROMPTS
    base_answers = [r["response"] for r in rows if r["model"] == "base"]
    adapted = [r["response"] for r in rows if r["model"] == "random_adapter"]
    assert base_answers != adapted  # the adapter was really applied
    assert "| base | base |" in result.stdout and "random_adapter vs base" in result.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(report["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "rayalign-eval"
    base = report["models"][0]["judge"]
    assert run.data.metrics["base/violations"] == base["violations"]
    assert run.data.metrics["random_adapter/pairwise_wins"] == pair["wins"]
    assert {"report.json", "report.md", "violations.png"} <= {f.path for f in client.list_artifacts(run.info.run_id)}


def test_evaluate_missing_model_path_exits_2_with_one_line(tmp_path):
    result = run_job("evaluate.py", "--model", str(tmp_path / "no_such_model"), cwd=tmp_path,
                     env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --model {tmp_path / 'no_such_model'}: no such directory, and not an MLflow run id"]
