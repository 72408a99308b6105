"""jobs/ppo.py end to end on the real SmolLM2: CPU vLLM engines, the judge on Ray Serve (or an OpenAI-compatible
endpoint), a Ray Train + DeepSpeed learner, MLflow. Each test starts its own job (its own local Ray), as a user would.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import ROOT, ray_head, run_job
from rayalign.learner.checkpoints import checkpoint_steps

pytestmark = pytest.mark.slow

# PPO on 4 prompts a step (not the default's group filter, whose steps may all tie on the rule at 32 tokens and
# make no update): the held-out report at the end runs in the first test only
SMALL = ["algorithm.name=ppo", "sampling.n=1", "algorithm.dynamic_sampling=false", "algorithm.minibatch_size=8",
         "learner.lr=5e-5", "trainer.prompts_per_step=4", "sampling.max_new_tokens=32", "tracking.sample_every=1",
         "heldout.enabled=false"]
CONSOLE_LINES = 45  # what two default steps with a 6-prompt held-out report may print (vLLM, Ray, ... go to the log)
# Dr. GRPO groups of 2, the KL in the loss (its default), one minibatch: the learner's single-pass step; with
# DAPO's clip-higher and its overlong punishment over the last 8 of 32 tokens
DR_GRPO_ONE_PASS = ["algorithm.name=dr_grpo", "sampling.n=2", "algorithm.minibatch_size=8",
                    "algorithm.clip_eps_high=0.28", "algorithm.overlong_buffer=8", "sampling.ignore_eos=true"]


def _runs(cwd: Path, experiment: str = "rayalign-ppo"):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


def _steps(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_two_steps_with_the_default_reward(tmp_path, model_path):
    result = run_job("ppo.py", "trainer.total_steps=2", "trainer.checkpoint_every=1", *SMALL, "heldout.enabled=true",
                     "heldout.limit=6", "heldout.max_new_tokens=32", cwd=tmp_path, timeout=900)
    (log,) = (tmp_path / "outputs" / "logs").glob("*.log")
    assert result.returncode == 0, result.stderr[-4000:] + log.read_text()[-4000:]
    assert "MLflow run" in result.stdout and "reward" in result.stdout and f"full log: {log}" in result.stdout

    # the console: rayalign's lines, every step with its ETA; the engines', Ray's and DeepSpeed's in the log
    console = result.stdout.splitlines() + result.stderr.splitlines()
    assert len(console) <= CONSOLE_LINES, "\n".join(console)
    steps = [line for line in result.stderr.splitlines() if " step " in line and " reward " in line]
    assert len(steps) == 2 and "step 1/2" in steps[0] and "ETA" in steps[0] and steps[1].endswith("done"), steps
    assert "Ray Train + DeepSpeed" in result.stderr  # what is starting, and
    for noise in ("EngineCore", "Attempted to load weight", "Initializing a V1 LLM engine", "[real_accelerator"):
        assert noise not in result.stdout + result.stderr, noise  # none of the engines' or DeepSpeed's own lines
    log_text = log.read_text()
    assert "step 2/2" in log_text and "INFO" in log_text and len(log_text.splitlines()) > 3 * len(console)

    # the held-out report: the base (answered before the first update) and the aligned policy, side by side
    assert "held-out: 6 prompts" in result.stdout and "guards: length" in result.stdout, result.stdout
    table = result.stdout[result.stdout.index("held-out: 6 prompts"):]
    assert "\nbase " in table and "\naligned " in table and "aligned vs base: violations" in table

    client, runs = _runs(tmp_path)
    (run,) = runs
    assert run.info.status == "FINISHED"
    for key in ("reward/mean", "reward/std", "score/mean", "kl", "train/policy_loss", "train/value_loss",
                "train/entropy", "train/clip_frac", "response_length/mean", "tokens_per_second", "time/generate",
                "time/judge", "time/logprobs", "time/train", "time/sync", "judge/failures", "reward/judge/mean",
                "reward/lexicon/mean"):
        assert _steps(client, run.info.run_id, key) == [1, 2], key
    assert run.data.metrics["policy_version"] == 2
    assert run.data.metrics["kl/k3"] > 0  # the policy moved away from the reference (k1 can be negative)

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "curves.png", "samples", "model"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {"model/adapter", "model/merged"}

    (run_dir,) = (tmp_path / "checkpoints").iterdir()
    assert checkpoint_steps(str(tmp_path / "checkpoints"), run_dir.name) == [1, 2]
    state = json.loads((run_dir / "checkpoint_000002" / "driver_state.json").read_text())
    assert state["step"] == 2 and state["version"] == 2
    base_answers = state["heldout_base"]["responses"]
    assert len(base_answers) == 6 and all(isinstance(a, str) for a in base_answers)
    heldout = json.loads(Path(client.download_artifacts(run.info.run_id, "heldout/report.json", str(tmp_path)))
                         .read_text())
    base, aligned = heldout["models"]
    for m in (base, aligned):
        judge = m["judge"]
        assert judge["violations"] + judge["passes"] + judge["failures"] == m["prompts"] == 6
        assert 0 <= m["rule"]["violations"] <= 6 and 0 <= m["independent"]["violations"] <= 6
        assert run.data.metrics[f"heldout/{m['label']}/rule_violation_rate"] == m["rule"]["violation_rate"]
    assert set(aligned["guards"]["passed"]) == {"length", "distinct_2", "refusals", "repetitive"}
    assert run.data.metrics["heldout/aligned/guards/held"] == float(aligned["guards"]["held"])
    for sample in heldout["samples"]:  # real answers of each model, where they differ
        assert sample["base"]["response"] in base_answers
        assert sample["candidate"]["response"].strip() != sample["base"]["response"].strip()
        shown = " ".join(sample["candidate"]["response"].split())[:40]
        assert shown in " ".join(result.stdout.split())  # and printed
    merged = tmp_path / "outputs" / run_dir.name / "merged"
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))

    # the trained policy, evaluated by its MLflow run id (jobs/evaluate.py fetches the run's model/adapter) and as
    # the merged HF directory the job saved (its own engine)
    report_dir = tmp_path / "eval"
    evaluated = run_job("evaluate.py", "--model", run.info.run_id, "--model", str(merged), "data.limit=4",
                        "--out", str(report_dir), cwd=tmp_path, timeout=900)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    report = json.loads((report_dir / "report.json").read_text())
    assert [m["kind"] for m in report["models"]] == ["base", "adapter", "merged"]
    assert report["models"][1]["label"] == f"run-{run.info.run_id[:8]}"
    for m in report["models"]:
        assert m["judge"]["violations"] + m["judge"]["passes"] + m["judge"]["failures"] == m["prompts"] == 4
    assert len(report["pairwise"]) == 2
    for pair in report["pairwise"]:
        assert pair["wins"] + pair["ties"] + pair["losses"] + pair["failed"] == 4
    answers = [json.loads(line) for line in (report_dir / "samples.jsonl").read_text().splitlines()]
    by_model = {m["label"]: [a["response"] for a in answers if a["model"] == m["label"]] for m in report["models"]}
    # greedy answers of the adapter on the base and of the merged weights: the same policy, the same first words
    adapter_answers, merged_answers = by_model[report["models"][1]["label"]], by_model[report["models"][2]["label"]]
    assert sum(a.split()[:5] == b.split()[:5] for a, b in zip(adapter_answers, merged_answers)) >= 2
    assert len(answers) == 3 * 4 and by_model["base"] != adapter_answers  # the trained adapter was applied
    # the rest of the report (the only evaluate run of the suite: engine and judge starts dominate its time)
    for m in report["models"]:
        assert sum(m["judge"]["histogram"]["counts"]) == m["judge"]["violations"] + m["judge"]["passes"]
        assert 0 <= m["rule"]["violations"] <= 4 and m["response_tokens_mean"] > 0
    assert all(p["win_rate"] is None or 0 <= p["win_rate"] <= 1 for p in report["pairwise"])
    adapter_label = report["models"][1]["label"]
    # side by side: at most 5 prompts per aligned model, each against the base
    per_model = collections.Counter(s["model"] for s in report["samples"])
    assert set(per_model) == {adapter_label, report["models"][2]["label"]} and max(per_model.values()) <= 5
    assert all(s["baseline"] == "base" for s in report["samples"])
    for name in ("score_histograms.png", "violations.png"):
        assert (report_dir / name).stat().st_size > 1000
    assert f"| {adapter_label} | adapter |" in (report_dir / "report.md").read_text()
    assert "## Side by side" in (report_dir / "report.md").read_text() and "| base | base |" in (
        report_dir / "report.md").read_text()
    assert "\nbase " in evaluated.stdout and "guards: length" in evaluated.stdout
    eval_client, (eval_run,) = _runs(tmp_path, "rayalign-eval")
    assert eval_run.info.run_id == report["mlflow_run_id"] and eval_run.info.status == "FINISHED"
    assert eval_run.data.metrics["base/violations"] == report["models"][0]["judge"]["violations"]
    pair = report["pairwise"][0]
    assert eval_run.data.metrics[f"{pair['model']}/pairwise_wins"] == pair["wins"]
    assert {"report.json", "report.md", "violations.png"} <= {
        f.path for f in eval_client.list_artifacts(eval_run.info.run_id)}


# --- a judge endpoint that fails some requests, and a run killed after a checkpoint then resumed ------------------


class _FlakyJudge(BaseHTTPRequestHandler):
    """OpenAI-compatible chat completions: every third request gets an answer with no score in it."""

    count = 0
    fail_every = 3
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            type(self).count += 1
            n = self.count
        content = "I would rather not grade this." if n % self.fail_every == 0 else " 0.8"
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _NeverScores(_FlakyJudge):
    fail_every = 1


def _serve(handler):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


@pytest.fixture
def flaky_judge():
    server, url = _serve(_FlakyJudge)
    yield url
    server.shutdown()


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the job and everything it started (its local Ray included): they share its session."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    sid = proc.pid
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            if os.getsid(pid) == sid:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def test_failed_judgements_are_dropped_and_a_killed_run_resumes_exactly(tmp_path, flaky_judge, model_path):
    from rayalign.data.prompts import load_prompts, prompt_indices

    # REINFORCE++ with truncated IS: no groups (a failed judgement drops one sample), the KL in the reward
    args = [*SMALL, "trainer.checkpoint_every=1", "trainer.run_name=resumable", "learner.lora_sync=adapter",
            "algorithm.name=reinforce_pp", "algorithm.tis_cap=2.0", "reward.judge.backend=openai",
            f"reward.judge.url={flaky_judge}", "reward.judge.endpoint_model=stub", "reward.components=[]"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "ppo.py"), "trainer.total_steps=3", *args],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while "checkpoint of step 1 saved" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.time() < deadline, "no checkpoint within 10 minutes"
            time.sleep(1)
    finally:
        _kill_tree(proc)
    assert "step 2/3" not in log_path.read_text()  # killed during step 2

    result = run_job("ppo.py", "trainer.total_steps=2", "trainer.resume=true", *args, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "held-out" not in result.stdout + result.stderr  # heldout.enabled=false: no base answers, no report
    assert "(resuming)" in result.stderr

    client, runs = _runs(tmp_path)
    (run,) = runs  # the resumed job continues the same MLflow run
    run_id = run.info.run_id
    assert _steps(client, run_id, "reward/mean") == [1, 2]  # step 1 from the first job, step 2 from the resumed one
    # the resumed step trained on exactly the prompts the uninterrupted run would have used
    dataset = load_prompts("builtin:vegetarian/train")
    expected = [dataset.prompts[i] for i in prompt_indices(len(dataset.prompts), 4, 2, seed=0)]
    table = json.loads(Path(client.download_artifacts(run_id, "samples/step_00002.json", str(tmp_path))).read_text())
    prompts = [row[table["columns"].index("prompt")] for row in table["data"]]
    assert set(prompts) <= set(expected) and len(set(expected) - set(prompts)) <= 1  # a failed judgement drops one

    # every third judgement failed: those samples were dropped and counted, and training went on
    failures = client.get_metric_history(run_id, "judge/failures")
    kept = client.get_metric_history(run_id, "samples/kept")
    assert sum(m.value for m in failures) >= 1
    assert all(f.value + k.value == 4 for f, k in zip(failures, kept))
    assert run.data.metrics["policy_version"] == 2
    for key in ("train/tis_cap_frac", "train/tis_weight", "train/clip_frac_low", "train/clip_frac_high"):
        assert _steps(client, run_id, key) == [1, 2], key
    assert 0 <= run.data.metrics["train/tis_cap_frac"] <= 1 and run.data.metrics["train/tis_weight"] > 0

    # a new run from a chosen (not the latest) checkpoint: step 1's state, so it trains step 2 on step 2's prompts
    chosen = tmp_path / "checkpoints" / "resumable" / "checkpoint_000001"
    fork_args = [a for a in args if not a.startswith("trainer.run_name=")]
    forked = run_job("ppo.py", "trainer.total_steps=2", f"trainer.resume_from={chosen}", "trainer.run_name=forked",
                     *fork_args, cwd=tmp_path, timeout=900)
    assert forked.returncode == 0, forked.stderr[-4000:]
    assert f"(from {chosen})" in forked.stderr
    client, runs = _runs(tmp_path)
    (fork_run,) = [r for r in runs if r.info.run_id != run_id]  # a new MLflow run; the original one untouched
    assert fork_run.data.tags["resumed_from"] == str(chosen)
    assert _steps(client, fork_run.info.run_id, "reward/mean") == [2]
    assert _steps(client, run_id, "reward/mean") == [1, 2]
    table = json.loads(Path(client.download_artifacts(fork_run.info.run_id, "samples/step_00002.json",
                                                      str(tmp_path / "fork"))).read_text())
    assert set(row[table["columns"].index("prompt")] for row in table["data"]) <= set(expected)
    state = json.loads((tmp_path / "checkpoints" / "forked" / "checkpoint_000002" / "driver_state.json").read_text())
    assert state["step"] == 2 and state["version"] == 2 and state["mlflow_run_id"] == fork_run.info.run_id


# --- the user's command: ray job submit to a Ray head ---------------------------------------------------------------


@pytest.mark.long  # the stop itself is unit-tested; this runs the job
def test_a_judge_that_never_scores_stops_the_job(tmp_path, model_path):
    """Every answer unreadable: each step is dropped and counted, and after trainer.max_failed_steps such steps
    in a row the job stops with one line (the finished step checkpointed) instead of running on empty."""
    server, url = _serve(_NeverScores)
    try:
        result = run_job("ppo.py", *SMALL, "trainer.total_steps=5", "trainer.max_failed_steps=2",
                         "trainer.checkpoint_every=0", "reward.judge.backend=openai", f"reward.judge.url={url}",
                         "reward.judge.endpoint_model=stub", "reward.components=[]", cwd=tmp_path, timeout=900)
    finally:
        server.shutdown()
    assert result.returncode == 1, result.stderr[-4000:]
    # (Ray's workers may print their own shutdown noise after it)
    assert ("error: judging left too few samples to train on in 2 steps in a row (trainer.max_failed_steps); "
            f"stopping at step 2 (steps up to 1 are checkpointed in {tmp_path / 'checkpoints'}/"
            f"{_only_run(tmp_path)})\n") in result.stderr, result.stderr[-3000:]
    assert "step 1: 4 of 4 judgements failed, e.g. judge: unparsable judge answer" in result.stderr
    client, (run,) = _runs(tmp_path)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "judge/failures")] == [
        (1, 4.0), (2, 4.0)]


def _only_run(cwd: Path) -> str:
    (run,) = [p.name for p in (cwd / "checkpoints").iterdir() if p.is_dir()]
    return run


@pytest.mark.long  # a second head and a whole job
def test_ray_job_submit_on_a_local_head(tmp_path, model_path):
    """`ray start --head`, then `ray job submit --working-dir . -- python jobs/ppo.py trainer.total_steps=1` from the
    checkout; the venv, the model cache and MLflow live outside the uploaded working dir."""
    venv_bin = str(Path(sys.executable).parent)
    with ray_head(8, dashboard=True, extra_env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}) \
            as (_, dashboard, env):
        for _ in range(24):  # a fresh head's job agent comes up some seconds after `ray start` returns
            submit = subprocess.run(
                [f"{venv_bin}/ray", "job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--working-dir", ".",
                 "--", "python", "jobs/ppo.py", "trainer.total_steps=2", *SMALL, *DR_GRPO_ONE_PASS,
                 "learner.full_sync=broadcast",  # the merged weights reach the engine by a gloo broadcast
                 f"trainer.storage_path={tmp_path / 'checkpoints'}", f"trainer.output_dir={tmp_path / 'outputs'}"],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
            if "No available agent to submit job" not in submit.stdout + submit.stderr:
                break
            time.sleep(5)
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:]
        assert "succeeded" in submit.stdout + submit.stderr
    client, runs = _runs(tmp_path)
    (run,) = runs
    assert run.info.status == "FINISHED" and _steps(client, run.info.run_id, "reward/mean") == [1, 2]
    assert list((tmp_path / "checkpoints").glob("*/checkpoint_000002"))
    # Dr. GRPO, KL in the loss, one optimizer step: no separate logprob pass, the KL still measured (from the
    # training pass's own logprobs)
    assert run.data.metrics["time/logprobs"] == 0.0 and run.data.metrics["train/kl_loss"] >= 0
    for key in ("train/clip_frac_high", "reward/overlong_penalty/mean"):  # DAPO's clip-higher and overlong penalty
        assert _steps(client, run.info.run_id, key) == [1, 2], key
    assert run.data.metrics["reward/overlong_penalty/mean"] == -1.0  # every answer ran to its 32 tokens
    assert run.data.metrics["kl/k3"] >= 0 and abs(run.data.metrics["rollout/logprob_diff"]) < 1.0
    # the broadcast sent the whole merged model in the engine's dtype (bf16), and nothing went through files
    assert run.data.metrics["sync/bytes"] == 2 * _exported_numel(model_path)
    assert run.data.metrics["sync/copied_bytes"] == 0


def _exported_numel(model_path: str) -> int:
    """Elements of the weights the learner exports: each parameter once (the tied lm_head is the embedding)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return sum(p.numel() for p in model.parameters())
