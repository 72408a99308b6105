"""What the benchmarks that run rayalign's jobs against another stack share: running a side in its own
subprocess, offline, with its output in a log file, and reading a job's metrics back from its MLflow store."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def child_env() -> dict[str, str]:
    """The environment of a benchmarked subprocess: offline, and MLflow left to the job's default store
    (sqlite:///<cwd>/mlflow.db)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_logged(cmd: list[str], cwd: Path, log: Path, what: str) -> float:
    """Run ``cmd`` in ``cwd`` with its output in ``log``; its wall seconds. A failure ends the benchmark with
    the log's last lines."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=cwd, env=child_env(), stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        raise SystemExit(f"{what} failed (exit {rc}); last lines of {log}:\n" + "\n".join(tail))
    seconds = time.perf_counter() - t0
    print(f"{what}: done in {seconds:.0f} s (log {log})", flush=True)
    return seconds
