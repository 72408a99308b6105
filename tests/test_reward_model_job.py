"""jobs/train_reward_model.py end to end on the real SmolLM2: a sequence classifier on the Ray Train + DeepSpeed
learner, exact resume, pairwise accuracy on held-out pairs, and the saved model loaded as a reward component --
by the job's own validation and as the reward of a jobs/ppo.py step (the README's RLAIF distillation recipe)."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, run_job

pytestmark = pytest.mark.slow


def _runs(cwd, experiment="rayalign-reward-model"):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def _history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _labelled_sample(path, per_label: int = 12):
    """The first ``per_label`` good and bad answers of the shipped judge-validation set (it is sorted by category)."""
    from rayalign.data.prompts import dataset_path

    rows = [json.loads(line) for line in dataset_path("builtin:vegetarian/judge_validation").read_text().splitlines()]
    picked = [r for r in rows if r["label"] == 1][:per_label] + [r for r in rows if r["label"] == 0][:per_label]
    path.write_text("".join(json.dumps(r) + "\n" for r in picked))
    return path


LEARNS = ["data.limit=120", "data.eval_fraction=0.25", "algorithm.minibatch_size=8", "learner.micro_batch_size=4",
          "data.max_length=384", "trainer.total_steps=8"]


def test_reward_model_learns_resumes_exactly_and_replaces_the_judge_in_ppo(tmp_path):
    """The RLAIF distillation recipe on a few rows. 8 steps of 8 judge-labelled pairs: the model ranks the 30
    held-out pairs' chosen answer first more often than chance; a run from the step-7 checkpoint repeats step 8
    exactly; the saved directory is a reward model, and jobs/ppo.py trains a step with it in the judge's place
    (jobs/configs/ppo_reward_model.yaml)."""
    labelled = _labelled_sample(tmp_path / "labelled.jsonl")
    first = run_job("train_reward_model.py", *LEARNS, "trainer.checkpoint_every=7", "trainer.eval_every=0",
                    "trainer.run_name=first", "tracking.run_name=first", f"validation.data={labelled}",
                    cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "reward model: loss" in first.stdout and "as a reward component on 24 labelled answers" in first.stdout
    client, runs = _runs(tmp_path)
    run = runs["first"]
    for key in ("train/loss", "train/rewards/accuracy", "train/rewards/margin", "tokens_per_second"):
        assert set(_history(client, run.info.run_id, key)) == set(range(1, 9)), key
    metrics = run.data.metrics
    assert metrics["data/eval_pairs"] == 30
    assert _history(client, run.info.run_id, "eval/rewards/accuracy")[8] > 0.5  # 30 pairs never trained on
    assert metrics["validation/judged"] == 24 and 0.0 <= metrics["validation/auc"] <= 1.0  # it scored every row
    assert metrics["data/pairs_without_scores"] == 0  # the pipeline pairs carry the judge's scores

    merged = tmp_path / "outputs" / "first" / "merged"
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    assert config["pad_token_id"] is not None  # the head pools the last token that is not padding
    assert not (tmp_path / "outputs" / "first" / "adapter").exists()  # it would lack the trained head
    from rayalign.judge.reward_model import RewardModelScorer, check_classifier

    check_classifier(str(merged))
    scorer = RewardModelScorer(str(merged), batch_size=2, max_length=512, use_gpu=False)
    (alone,), pair = scorer.score(["Soup?"], ["Lentil soup."]), scorer.score(["Soup?", "Tea?"],
                                                                               ["Lentil soup.", "Green tea."])
    assert alone[0] == pytest.approx(pair[0][0], abs=1e-4)  # padding in a batch does not move a score

    resumed = run_job("train_reward_model.py", *LEARNS, "trainer.eval_every=0",
                      "trainer.resume_from=checkpoints/first/checkpoint_000007", "trainer.run_name=second",
                      "tracking.run_name=second", "validation.enabled=false", cwd=tmp_path, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    client, runs = _runs(tmp_path)
    straight = _history(client, run.info.run_id, "train/loss")
    again = _history(client, runs["second"].info.run_id, "train/loss")
    assert set(again) == {8} and again[8] == pytest.approx(straight[8], abs=1e-5)

    ppo = run_job("ppo.py", "--config", str(ROOT / "jobs" / "configs" / "ppo_reward_model.yaml"),
                  f"reward.components.0.model={merged}", "trainer.total_steps=1", "trainer.prompts_per_step=4",
                  "algorithm.name=ppo", "sampling.n=1", "algorithm.dynamic_sampling=false", "sampling.max_new_tokens=64",
                  "heldout.enabled=false", cwd=tmp_path, timeout=1200)
    assert ppo.returncode == 0, ppo.stderr[-4000:]
    client, runs = _runs(tmp_path, "rayalign-ppo")
    (run,) = runs.values()
    assert "reward/reward_model/mean" in run.data.metrics and "reward/lexicon/mean" in run.data.metrics
    assert "reward/judge/mean" not in run.data.metrics  # no LLM judge ran
