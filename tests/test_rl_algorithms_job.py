"""jobs/ppo.py, two steps with each RL algorithm beyond PPO/GRPO/RLOO, on the embedded SmolLM2 (real engine,
learner and MLflow), with the options that go with it; the rule reward alone, so no judge deployment starts.
reinforce_pp (with truncated IS) runs in tests/test_ppo_job.py's resume test, dr_grpo (with clip-higher and the
overlong punishment) in its `ray job submit` test: each job start costs about a minute and a half."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_job

pytestmark = pytest.mark.slow

TINY = ["trainer.total_steps=2", "trainer.checkpoint_every=0", "sampling.max_new_tokens=24", "sampling.n=2",
        "algorithm.dynamic_sampling=false",
        "heldout.enabled=false",
        "tracking.sample_every=1", "reward.components=[{name: lexicon, kind: rule, weight: 1.0, "
        "rule: vegetarian_lexicon}]"]

CASES = {
    "reinforce_pp_baseline": (["trainer.prompts_per_step=2", "algorithm.minibatch_size=4",
                               "algorithm.loss_agg=seq_mean"], ["train/policy_loss", "kl"]),
    # DAPO-style: no KL, so no reference model and no reference pass
    "gspo": (["trainer.prompts_per_step=4", "algorithm.minibatch_size=8", "algorithm.dynamic_sampling=true",
              "algorithm.dynamic_sampling_by=lexicon", "algorithm.oversample=2", "algorithm.max_sampling_rounds=2",
              "algorithm.kl_coef=0"],
             ["dynamic_sampling/tied_groups", "dynamic_sampling/rounds", "dynamic_sampling/groups_short"]),
}


def _run(cwd: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rayalign-ppo")
    (run,) = client.search_runs([exp.experiment_id])
    return client, run


@pytest.mark.long  # one job per algorithm
@pytest.mark.parametrize("name", list(CASES))
def test_two_steps(tmp_path, name):
    extra, keys = CASES[name]
    result = run_job("ppo.py", f"algorithm.name={name}", *TINY, *extra, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    client, run = _run(tmp_path)
    assert run.info.status == "FINISHED"
    history = {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)} for k in keys}
    for key, values in history.items():
        assert sorted(values) == [1, 2], (key, values)
    if name == "gspo":
        # a KL coefficient of 0 runs no reference: no KL is reported rather than a made-up 0
        assert not client.get_metric_history(run.info.run_id, "kl")
        if "\nreward " in result.stdout:  # the summary of a run that trained (every group may tie, and then not)
            assert "KL not measured (algorithm.kl_coef 0: no reference)" in result.stdout, result.stdout[-2000:]
        # dynamic sampling kept only groups whose two rewards differ (ties carry no GSPO signal)
        for step in (1, 2):
            try:
                path = client.download_artifacts(run.info.run_id, f"samples/step_{step:05d}.json", str(tmp_path))
            except Exception:  # every group tied after the refills: that step made no update
                continue
            table = json.loads(Path(path).read_text())
            rewards = [row[table["columns"].index("reward")] for row in table["data"]]
            assert rewards and all(a != b for a, b in zip(rewards[0::2], rewards[1::2])), rewards
