"""Where Ray plumbing lives: joining or starting Ray, and the options each kind of actor is launched with.

Resources come from config here, where actors are launched; nothing is hard-coded in decorators.
"""

from __future__ import annotations

import os
from typing import Any

from rayalign.config import EngineConfig, RayConfig
from rayalign.models import CACHE_ENV, cache_dir


def init_ray(config: RayConfig) -> str:
    """Join ``config.address`` or ``$RAY_ADDRESS`` (what ``ray job submit`` sets), else start a local Ray.

    Returns the address joined ("local" for a new local Ray). A local Ray gets ``address="local"`` explicitly:
    a bare ``ray.init`` would try to join a head recorded in /tmp/ray by an earlier, killed run.
    """
    import ray

    if ray.is_initialized():
        return "existing"
    address = config.address or os.environ.get("RAY_ADDRESS", "") or "local"
    kwargs: dict[str, Any] = {"address": address, "namespace": config.namespace, "log_to_driver": True}
    if address == "local":
        kwargs.update(num_cpus=config.num_cpus, include_dashboard=False)
    ray.init(**kwargs)
    return address


def worker_env() -> dict[str, str]:
    """Environment every rayalign actor needs, so that workers on other nodes resolve models the same way."""
    env = {CACHE_ENV: str(cache_dir()), "TOKENIZERS_PARALLELISM": "false"}
    for name in ("HF_HOME", "HF_HUB_OFFLINE", "MLFLOW_TRACKING_URI"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def engine_actor_options(engine: EngineConfig) -> dict[str, Any]:
    """Ray actor options for one vLLM engine."""
    env = worker_env()
    if engine.num_gpus == 0:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(engine.cpu_kvcache_gib)
    return {
        "num_cpus": engine.num_cpus,
        "num_gpus": engine.num_gpus,
        "runtime_env": {"env_vars": env},
        # Ray restarts an engine whose process dies and retries the call it was serving; the restarted engine
        # pulls the latest published weights in its constructor, before it takes that call.
        "max_restarts": -1,
        "max_task_retries": 2,
    }
