"""Serve a model on Ray Serve: the OpenAI API and a chat page for a person to try it.

What is served, in order of precedence:
  - ``serve.run_id``: the policy saved by a ``jobs/ppo.py`` run in MLflow: its LoRA adapter (``model/adapter``) on
    the run's own base model when the run has one, otherwise its merged model (``model/merged``);
  - ``serve.adapter``: a peft LoRA adapter directory on top of ``model.name``;
  - ``model.name`` alone: the embedded model, or any HF directory (a merged model, say).

Two backends (``serve.backend``):
  - ``ray_serve_llm`` (default): Ray Serve's own LLM app (``ray.serve.llm``, what KubeRay's LLM samples serve
    with): chat and text completions, streaming, n, stop, logprobs, autoscaling replicas; request fields vLLM
    does not know are refused with 400. It loads adapters from S3/GCS/Azure only (``serve.lora_path``), so a local
    adapter is first merged into its base here.
        http://127.0.0.1:8000/v1/chat/completions    the OpenAI API (base_url http://127.0.0.1:8000/v1)
        http://127.0.0.1:8000/chat/                  the chat page
  - ``rayalign``: rayalign's own route over its rollout engines, the one a training run can watch: answers name
    the policy version the engines hold, adapters go through their dynamic LoRA (version 1). Chat completions
    only, one whole choice per request; streaming, n > 1, logprobs and the like are refused with 400.
        http://127.0.0.1:8000/chat/v1/chat/completions, http://127.0.0.1:8000/chat/ (the page)

Both bind to 127.0.0.1 unless ``serve.host`` says otherwise.

    python jobs/serve.py serve.run_id=<mlflow run id>          # what a jobs/ppo.py run saved
    python jobs/serve.py serve.adapter=outputs/<run>/adapter   # an adapter on the embedded base model
    python jobs/serve.py model.name=outputs/<run>/merged       # a merged HF directory
    python jobs/serve.py serve.duration_s=600                  # stop after 10 minutes (default: until Ctrl-C)
    python jobs/serve.py serve.backend=rayalign                # rayalign's own route (policy versions)

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
from typing import Literal

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
    backend: Literal["ray_serve_llm", "rayalign"] = "ray_serve_llm"
    """"ray_serve_llm": Ray Serve's LLM app (the whole OpenAI API, streaming included); "rayalign": rayalign's own
    route over its rollout engines (policy versions; chat only, one whole choice per request)."""
    lora_path: str = ""
    """ray_serve_llm: a cloud folder (s3://, gs://, abfss://, azure://) of adapters, each one requested as model
    "<served name>:<its folder>" and loaded on demand (LoRA multiplexing)."""
    start_timeout_s: float = 900.0
    """ray_serve_llm: seconds the app may take to start before the job stops with one line."""

    def validate(self) -> None:
        from rayalign.rollout.serve_llm import SUPPORTED_LORA_SCHEMES

        if self.lora_path and (self.backend != "ray_serve_llm" or not self.lora_path.startswith(SUPPORTED_LORA_SCHEMES)):
            raise C.ConfigError(f"serve.lora_path: ray.serve.llm loads adapters from {', '.join(SUPPORTED_LORA_SCHEMES)} "
                                f"folders (serve.backend=ray_serve_llm); got {self.lora_path!r} with {self.backend}")
        if self.start_timeout_s <= 0:
            raise C.ConfigError(f"serve.start_timeout_s: expected a float > 0, got {self.start_timeout_s}")
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
    """vLLM engines (ray_serve_llm: replicas), each one a model copy; requests are spread over them."""
    sampling: C.SamplingConfig = C.SamplingConfig(temperature=0.7, max_new_tokens=256)
    """Defaults for requests that leave max_tokens, temperature or top_p out (and seed, on the rayalign backend)."""
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
        return serve(cfg, served, download_dir)
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)


def serve(cfg: ServeJobConfig, served: Served, download_dir: Path) -> int:
    """Start the backend on the joined Ray, wait, take everything down again (also on Ctrl-C). Returns the exit
    code: 0, or 1 with one line when the app failed to start or did not start in time."""
    import ray

    from rayalign.job import refuse

    # Ctrl-C and `kill` both stop cleanly, also where the launcher left SIGINT ignored (a background job of a script)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    stop = None
    try:
        t0 = time.perf_counter()
        url, api, stop = BACKENDS[cfg.serve.backend](cfg, served, download_dir)
        log.info("%s on %d replica(s) (%s), ready in %.0f s", served.name, cfg.engine.num_engines, cfg.serve.backend,
                 time.perf_counter() - t0)
        print(f"\nserving {served.name}\n  chat page: {url}/chat/\n  API:       {api}/chat/completions\n"
              + (f"for {cfg.serve.duration_s:g} s" if cfg.serve.duration_s else "Ctrl-C stops"), flush=True)
        _wait(cfg.serve.duration_s)
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError) as e:  # the app did not start (serve_llm.wait_running's one line)
        refuse(e)
        return 1
    finally:
        print("stopping", file=sys.stderr, flush=True)
        if stop is not None:
            stop()
        ray.shutdown()
    return 0


def serve_llm(cfg: ServeJobConfig, served: Served, download_dir: Path):
    """ray.serve.llm's OpenAI app; a local adapter is merged into its base first. Returns (base URL, API URL, stop)."""
    from rayalign.config import lora_rank_slot
    from rayalign.models import merge_adapter
    from rayalign.rollout.serve_llm import llm_config, start_llm_app, stop_llm_app

    model_path = served.model_path
    if served.adapter:
        log.info("merging %s into %s (ray.serve.llm loads adapters from cloud storage only)", served.adapter,
                 served.model_path)
        model_path = str(merge_adapter(served.model_path, served.adapter, download_dir / "merged"))
    config = llm_config(model_path, served.name, cfg.model, cfg.engine, defaults=cfg.sampling, lora_path=cfg.serve.lora_path,
                        max_lora_rank=lora_rank_slot(served.lora_rank) if served.lora_rank else 0)
    try:
        url = start_llm_app(config, host=cfg.serve.host, port=cfg.serve.port, start_timeout_s=cfg.serve.start_timeout_s)
    except BaseException:
        stop_llm_app()
        raise
    return url, f"{url}/v1", stop_llm_app


def serve_rollout_engines(cfg: ServeJobConfig, served: Served, download_dir: Path):
    """rayalign's route over its own rollout engines. Returns (base URL, API URL, stop)."""
    from rayalign.config import lora_rank_slot
    from rayalign.rollout.group import RolloutGroup
    from rayalign.rollout.serve import start_chat_server, stop_chat_server

    engines = RolloutGroup(served.model_path, cfg.model, cfg.engine, name="serve",
                           max_lora_rank=lora_rank_slot(served.lora_rank) if served.adapter else 0)
    try:
        if served.adapter:
            engines.load_adapter(served.adapter)
        url = start_chat_server(engines.engine_names, model_name=served.name, defaults=cfg.sampling,
                                host=cfg.serve.host, port=cfg.serve.port)
    except BaseException:
        engines.shutdown()
        raise

    def stop() -> None:
        stop_chat_server()
        engines.shutdown()

    return url.removesuffix("/chat"), f"{url}/v1", stop


BACKENDS = {"ray_serve_llm": serve_llm, "rayalign": serve_rollout_engines}
"""serve.backend -> the function that starts it."""


if __name__ == "__main__":
    sys.exit(main())
