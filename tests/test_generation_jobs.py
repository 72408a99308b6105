"""jobs/generate_prompts.py and jobs/generate_preferences.py end to end on the real SmolLM2, through
`ray.data.llm` (vLLM engine stages, the judge on Ray Serve through ServeDeploymentProcessorConfig), with a
crash after the first shard and a resume, bad input rows, and an endpoint judge that fails for some rows."""

from __future__ import annotations

import collections
import http.server
import json
import math
import threading
from pathlib import Path

import pytest

from conftest import run_job

pytestmark = pytest.mark.slow


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _metrics(cwd: Path, experiment: str) -> dict[str, float]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              order_by=["attributes.start_time DESC"])
    return runs[0].data.metrics


@pytest.mark.long  # two runs; the preferences test runs the same Ray Data stages and shard resume
def test_generate_prompts_killed_after_first_shard_then_resumed(tmp_path):
    args = ["output.dir=out", "topics.per_topic=2", "pipeline.shard_size=8", "pipeline.batch_size=8"]
    first = run_job("generate_prompts.py", *args, cwd=tmp_path, env={"RAYALIGN_KILL_AFTER_SHARDS": "1"})
    assert first.returncode == -9, first.stderr[-3000:]  # killed by itself right after its first shard
    assert len(_manifest(tmp_path / "out")["shards"]) == 1

    second = run_job("generate_prompts.py", *args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "1 already written" in second.stdout
    shards = _manifest(tmp_path / "out")["shards"]
    assert sorted(int(s) for s in shards) == list(range(5))  # 20 topics x 2 = 40 requests in shards of 8
    assert all(s["requests"] == 8 for s in shards.values())

    import pyarrow.dataset as ds

    rows = ds.dataset(tmp_path / "out" / "prompts", format="parquet").to_table().to_pylist()
    requests = [r["request"] for r in rows]
    assert len(requests) == len(set(requests)), "a request kept twice"
    dropped = collections.Counter()
    for s in shards.values():
        dropped.update(s["dropped"])
    assert len(rows) + sum(dropped.values()) == 40, "a request neither kept nor counted as dropped"
    assert len(rows) >= 10, f"too few questions kept: {dropped}"
    assert len({r["prompt"].lower() for r in rows}) == len(rows)
    lines = [json.loads(line) for split in ("train", "holdout")
             for line in (tmp_path / "out" / f"{split}.jsonl").read_text().splitlines()]
    assert sorted(r["prompt"] for r in lines) == sorted(r["prompt"] for r in rows)
    assert all(r["prompt"].strip() and "?" in r["prompt"] for r in rows)
    metrics = _metrics(tmp_path, "rayalign-generate-prompts")
    assert metrics["kept"] == len(rows)
    assert sum(v for k, v in metrics.items() if k.startswith("dropped/")) == sum(dropped.values())


def _prompts_file(path: Path, prompts: list[str]) -> Path:
    rows = [json.dumps({"prompt": p}) for p in prompts]
    rows += [json.dumps({"text": "no prompt column"}), json.dumps({"prompt": "  "}), "{not json"]
    path.write_text("\n".join(rows) + "\n")
    return path


PROMPTS = ["What protein can I add to a salad?", "What should I grill at a summer barbecue?",
           "How do I make a rich broth for ramen?", "What can I pack for a school lunch?"]
SMALL = ["candidates.policy_samples=1", "sampling.max_new_tokens=48", "pipeline.shard_size=2",
         "pipeline.batch_size=8"]


def test_generate_preferences_with_the_serve_judge_and_a_rewrite_round(tmp_path):
    _prompts_file(tmp_path / "prompts.jsonl", PROMPTS)
    args = ["data.prompts=prompts.jsonl", "output.dir=out", *SMALL, "rewrite.rounds=1", "rewrite.critique_tokens=32"]
    done = run_job("generate_preferences.py", *args, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "starting the judge on Ray Serve" in done.stdout

    import datasets
    import pyarrow.dataset as ds

    out = tmp_path / "out"
    answers = ds.dataset(out / "candidates" / "answers", format="parquet").to_table().to_pylist()
    assert len(answers) == 4 * 3  # policy, good, bad per usable prompt
    assert {a["prompt"] for a in answers} == set(PROMPTS)  # the user's prompt, not the templated one
    judged = [a for a in answers if not a["error"]]
    assert judged and all(0 <= a["score"] <= 1 and "lexicon" in json.loads(a["components"]) for a in judged)
    assert all(a["score"] is None for a in answers if a["error"])  # failures are never scored
    assert all(a["error"] or not math.isnan(a["score"]) for a in answers)  # and a NaN never passes for a score
    rewrites = ds.dataset(out / "rewrite_1" / "answers", format="parquet").to_table().to_pylist()
    below = {a["key"] for a in judged if a["score"] < 0.5}
    assert {r["parent"] for r in rewrites} == below and all(r["critique"].strip() for r in rewrites)

    pairs = datasets.load_dataset("parquet", data_files=str(out / "pairs" / "*.parquet"), split="train")
    assert {"prompt", "chosen", "rejected"} <= set(pairs.column_names)
    assert len(pairs) >= 1 and set(pairs["prompt"]) <= set(PROMPTS)
    assert all(m >= 0.2 - 1e-9 for m in pairs["margin"])
    kto = datasets.load_dataset("parquet", data_files=str(out / "kto" / "*.parquet"), split="train")
    assert len(kto) == len(judged) + sum(1 for r in rewrites if not r["error"])
    assert all(label == (score >= 0.5) for label, score in zip(kto["label"], kto["score"]))

    from rayalign.data.preferences import load_preferences

    assert len(load_preferences(str(out / "pairs.jsonl")).examples) == len(pairs)
    metrics = _metrics(tmp_path, "rayalign-generate-preferences")
    assert metrics["dropped/input/missing_prompt"] == 1 and metrics["dropped/input/empty_prompt"] == 1
    assert metrics["dropped/input/bad_json_line"] == 1 and metrics["pairs"] == len(pairs)

    again = run_job("generate_preferences.py", *args, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "answers: every shard already written" in again.stdout and "starting the judge" not in again.stdout
    assert len(datasets.load_dataset("parquet", data_files=str(out / "pairs" / "*.parquet"), split="train")) == len(pairs)


class _FlakyJudge(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible judge that fails (HTTP 500) every request about a prompt holding FAILME."""

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        if "FAILME" in body:
            self.send_response(500)
            self.end_headers()
            return
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "0.8"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.mark.long  # a third preferences run
def test_generate_preferences_counts_an_endpoint_judge_failing_for_some_rows(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _prompts_file(tmp_path / "prompts.jsonl", PROMPTS[:2] + ["FAILME: what goes well with rice?"])
        reward = tmp_path / "reward.yaml"
        reward.write_text(f"""
reward:
  judge: {{backend: openai, url: "http://127.0.0.1:{server.server_port}/v1", endpoint_model: judge,
           max_retries: 0, breaker_failures: 50}}
  components:
    - {{name: judge, kind: judge, weight: 0.5}}
    - {{name: lexicon, kind: rule, weight: 1.0, rule: vegetarian_lexicon}}
""")
        done = run_job("generate_preferences.py", "--config", str(reward), "data.prompts=prompts.jsonl",
                       "output.dir=out", *SMALL, "rewrite.rounds=0", cwd=tmp_path)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr[-4000:]
    assert "starting the judge" not in done.stdout
    import pyarrow.dataset as ds

    answers = ds.dataset(tmp_path / "out" / "candidates" / "answers", format="parquet").to_table().to_pylist()
    failed = [a for a in answers if a["prompt"].startswith("FAILME")]
    assert len(failed) == 3 and all(a["score"] is None and "judge" in a["error"] for a in failed)
    assert all(a["score"] is not None for a in answers if not a["prompt"].startswith("FAILME"))
    metrics = _metrics(tmp_path, "rayalign-generate-preferences")
    assert metrics["dropped/judge_failed"] == 3 and metrics["dropped/no_pair/too_few_judged"] == 1


def test_generation_jobs_refuse_bad_configs_in_one_line(tmp_path):
    for script, arg, expected in [
        ("generate_prompts.py", "topics.file=nope", "topics.file: nope: not found"),
        ("generate_prompts.py", "filter.holdout_fraction=1.5", "filter.holdout_fraction"),
        ("generate_preferences.py", "rewrite.constitution=/nope.yaml", "constitution file not found"),
        ("generate_preferences.py", "candidates.policy_samples=-1", "sample counts must be >= 0"),
        ("generate_preferences.py", "data.prompts=missing.jsonl", "prompt file not found"),
    ]:
        proc = run_job(script, "output.dir=out", arg, cwd=tmp_path, timeout=120)
        assert proc.returncode == 2, (script, arg, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (script, arg, proc.stderr)
    helped = run_job("generate_preferences.py", "--help", cwd=tmp_path, timeout=60)
    assert helped.returncode == 0 and "rewrite.rounds" in helped.stdout and "pairs.min_margin" in helped.stdout
