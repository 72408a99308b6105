"""Serve a model on Ray Serve: an OpenAI-compatible chat route and a chat page for a person to try it.

What is served, in order of precedence:
  - ``serve.run_id``: the policy saved by a ``jobs/ppo.py`` run in MLflow: its LoRA adapter (``model/adapter``) on
    the run's own base model when the run has one, otherwise its merged model (``model/merged``);
  - ``serve.adapter``: a peft LoRA adapter directory on top of ``model.name``;
  - ``model.name`` alone: the embedded model, or any HF directory (a merged model, say).
Adapters go through the engines' dynamic LoRA (published as policy version 1), exactly as during training.

The route binds to 127.0.0.1 unless ``serve.host`` says otherwise. With the defaults:
    http://127.0.0.1:8000/chat/                      the chat page
    http://127.0.0.1:8000/chat/v1/chat/completions   POST, OpenAI chat format
    http://127.0.0.1:8000/chat/v1/models

    python jobs/serve.py serve.run_id=<mlflow run id>          # what a jobs/ppo.py run saved
    python jobs/serve.py serve.adapter=outputs/<run>/adapter   # an adapter on the embedded base model
    python jobs/serve.py model.name=outputs/<run>/merged       # a merged HF directory
    python jobs/serve.py serve.duration_s=600                  # stop after 10 minutes (default: until Ctrl-C)

A merged model from a run is downloaded to a temporary directory on this machine: on a multi-node cluster the
engines must be able to read it there (adapters travel through the object store and need no shared disk).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rayalign import config as C  # noqa: E402

log = logging.getLogger("rayalign.serve")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    run_id: str = ""
    """MLflow run id of a jobs/ppo.py run: serve the model it saved (its adapter, else its merged model)."""
    adapter: str = ""
    """A peft LoRA adapter directory (adapter_config.json + weights) to serve on top of model.name."""
    host: str = "127.0.0.1"
    """Interface the HTTP route listens on (0.0.0.0 exposes it to the network)."""
    port: int = 8000
    """HTTP port."""
    duration_s: float = 0.0
    """Stop after this many seconds (0: serve until Ctrl-C or SIGTERM)."""

    def validate(self) -> None:
        if self.run_id and self.adapter:
            raise C.ConfigError("serve.run_id and serve.adapter both name a model to serve; set one of them")
        if not 1 <= self.port <= 65535:
            raise C.ConfigError(f"serve.port: expected an int in [1, 65535], got {self.port}")
        if self.duration_s < 0:
            raise C.ConfigError(f"serve.duration_s: expected a float >= 0, got {self.duration_s}")
        if not self.host:
            raise C.ConfigError("serve.host: expected an interface address such as 127.0.0.1")


@dataclasses.dataclass(frozen=True)
class ServeJobConfig:
    model: C.ModelConfig = C.ModelConfig()
    """The model to serve, or the base model under serve.adapter (serve.run_id takes the run's own base)."""
    engine: C.EngineConfig = C.EngineConfig()
    """vLLM engines; requests go to them round robin."""
    sampling: C.SamplingConfig = C.SamplingConfig(temperature=0.7, max_new_tokens=256)
    """Defaults for requests that leave max_tokens, temperature, top_p or seed out."""
    serve: ServeConfig = ServeConfig()
    """What to serve, where, for how long."""
    ray: C.RayConfig = C.RayConfig(dashboard=False)
    """Which Ray."""

    def phases(self) -> list:
        """What runs at once (`rayalign.placement`)."""
        from rayalign import placement as P

        return [P.Phase("serving", tuple(P.engines(self.engine)))]


@dataclasses.dataclass(frozen=True)
class Served:
    model_path: str
    """What the engines load: a local HF directory or a hub id."""
    adapter: Path | None
    """A peft adapter directory applied through the engines' dynamic LoRA, or None."""
    lora_rank: int
    """The adapter's rank r (0 without one)."""
    name: str
    """The model id the API reports."""


def resolve_served(cfg: ServeJobConfig, download_dir: Path) -> Served:
    """What the config asks to serve, checked before anything heavy starts (`rayalign.models`): raises
    ModelSpecError or ModelNotFoundError with one line. Run artifacts are downloaded into ``download_dir``."""
    from rayalign.models import resolve_adapter, resolve_base, resolve_run_model

    if cfg.serve.run_id:  # the run's adapter goes on the base that run trained, not on model.name
        run = resolve_run_model(cfg.serve.run_id, download_dir, what="serve.run_id")
        name = run.run_name or cfg.serve.run_id
        if run.kind == "merged":
            return Served(run.path, None, 0, name)
        base = resolve_base(run.run_model_name or C.ModelConfig().name)
        return Served(base, Path(run.path), run.lora_rank, name)
    model_path = resolve_base(cfg.model.name)
    if not cfg.serve.adapter:
        return Served(model_path, None, 0, cfg.model.name)
    adapter = resolve_adapter(cfg.serve.adapter, what="serve.adapter")
    path = Path(adapter.path)
    return Served(model_path, path, adapter.lora_rank, f"{path.parent.name}/{path.name}")


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _wait(duration_s: float) -> None:
    """Return after ``duration_s`` seconds (never when 0); Ctrl-C and SIGTERM raise KeyboardInterrupt."""
    deadline = time.monotonic() + duration_s if duration_s > 0 else math.inf
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(1.0, left))


def main(argv: list[str] | None = None) -> int:
    cfg = C.parse_job_config(ServeJobConfig, argv, description=__doc__ or "")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from rayalign.job import INPUT_ERRORS, refuse, start_ray

    local_ray = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    download_dir = Path(tempfile.mkdtemp(prefix="rayalign-serve-"))
    try:
        try:
            served = resolve_served(cfg, download_dir)
            if local_ray and _port_in_use(cfg.serve.host, cfg.serve.port):
                raise C.ConfigError(f"serve.port: {cfg.serve.host}:{cfg.serve.port} is already in use")
        except INPUT_ERRORS as e:
            return refuse(e)
        try:
            start_ray(cfg.ray, cfg.phases())
        except C.ConfigError as e:
            return refuse(e, "config error")
        serve(cfg, served)
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)
    return 0


def serve(cfg: ServeJobConfig, served: Served) -> None:
    """Start the engines and the route on the joined Ray, wait, take everything down again (also on Ctrl-C)."""
    import ray

    from rayalign.config import lora_rank_slot
    from rayalign.rollout.group import RolloutGroup
    from rayalign.rollout.serve import start_chat_server, stop_chat_server

    # Ctrl-C and `kill` both stop cleanly, also where the launcher left SIGINT ignored (a background job of a script)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    engines, routed = None, False
    try:
        t0 = time.perf_counter()
        engines = RolloutGroup(served.model_path, cfg.model, cfg.engine, name="serve",
                               max_lora_rank=lora_rank_slot(served.lora_rank) if served.adapter else 0)
        if served.adapter:
            engines.load_adapter(served.adapter)
        url = start_chat_server(engines.engine_names, model_name=served.name, defaults=cfg.sampling,
                                host=cfg.serve.host, port=cfg.serve.port)
        routed = True
        log.info("%s on %d engine(s), ready in %.0f s", served.name, cfg.engine.num_engines, time.perf_counter() - t0)
        print(f"\nserving {served.name}\n  chat page: {url}/\n  API:       {url}/v1/chat/completions\n"
              + (f"for {cfg.serve.duration_s:g} s" if cfg.serve.duration_s else "Ctrl-C stops"), flush=True)
        _wait(cfg.serve.duration_s)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping", file=sys.stderr, flush=True)
        if routed:
            stop_chat_server()
        if engines is not None:
            engines.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
