"""rayalign.plan: the capacity plan's arithmetic on a GPU profile, its command line, and its sources."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

from conftest import ROOT, load_job
from rayalign import config as C
from rayalign import plan as P


def _gpu_profile():
    return C.load_config(load_job("ppo.py").PPOJobConfig, ROOT / "jobs" / "configs" / "ppo_gpu.yaml")


def test_tokens_seconds_and_gpus_follow_the_config_and_the_rates():
    cfg = _gpu_profile()
    p = P.plan(cfg)
    samples = cfg.trainer.prompts_per_step * cfg.sampling.n
    assert p["samples_per_step"] == samples == 256
    assert p["tokens_per_step"]["policy_generated"] == samples * cfg.sampling.max_new_tokens
    assert p["tokens_per_step"]["judge_prompt"] == samples * (450 + 60 + 512)
    # generation: 131,072 tokens over 4 engines at 12,500 tokens/s each
    assert p["seconds_per_step"]["generate"] == round(samples * 512 / (4 * 12_500), 1)
    assert p["gpus"] == {"engines": 4, "judge": 8, "learner": 4, "total": 16}
    s = p["seconds_per_step"]
    assert abs(p["gpu_hours_per_1000_steps"] - 16 * s["total_sequential"] * 1000 / 3600) < 0.5  # (rounded)
    # twice the learner's efficiency halves its time and nothing else
    faster = {**P.RATES, "train_mfu": dataclasses.replace(P.RATES["train_mfu"], value=0.7)}
    q = P.plan(cfg, faster)["seconds_per_step"]
    assert abs(q["train"] - s["train"] / 2) <= 0.1 and q["generate"] == s["generate"] and q["judge"] == s["judge"]
    # a judge hosted elsewhere (the RayService, by URL) costs this cluster no GPU and no time
    hosted = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, judge=dataclasses.replace(
        cfg.reward.judge, backend="openai", url="http://rayalign-serve-svc:8000/judge/v1", endpoint_model="judge")))
    h = P.plan(hosted)
    assert h["gpus"]["judge"] == 0 and h["seconds_per_step"]["judge"] == 0


def test_every_rate_names_its_source():
    assert all(r.source and r.unit and r.value > 0 for r in P.RATES.values())


def test_the_command_line_prints_both_plans_and_refuses_a_cpu_profile(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rayalign.plan", "--config", "jobs/configs/ppo_gpu.yaml", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    small, big = data["plans"]
    assert "10x" in big["profile"] and big["gpus"]["total"] > small["gpus"]["total"]
    assert big["gpu_hours_per_1000_steps"] > small["gpu_hours_per_1000_steps"]
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({"no_such_rate": 1}))
    bad = subprocess.run([sys.executable, "-m", "rayalign.plan", "--config", "jobs/configs/ppo_gpu.yaml",
                          "--rates", str(rates)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown rate 'no_such_rate'" in bad.stderr
    cpu = subprocess.run([sys.executable, "-m", "rayalign.plan", "--config", "jobs/configs/ppo.yaml"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert cpu.returncode == 2 and "trains on CPU" in cpu.stderr
