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
import json
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

LORA_RANK_SLOTS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts (besides 1)


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


class ServeInputError(ValueError):
    """Something to serve that is not there: a missing adapter, run or artifact. One line."""


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


def check_adapter(path: Path) -> int:
    """Raise ServeInputError unless ``path`` is a peft LoRA adapter directory vLLM can load; returns its rank."""
    if not path.is_dir():
        raise ServeInputError(f"serve.adapter: {path} does not exist or is not a directory")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ServeInputError(f"serve.adapter: {path} is not a peft adapter directory (no adapter_config.json)")
    if not any((path / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ServeInputError(f"serve.adapter: {path} has adapter_config.json but no adapter_model.safetensors")
    try:
        adapter = json.loads(config_file.read_text())
    except ValueError:
        raise ServeInputError(f"serve.adapter: {config_file} is not valid JSON") from None
    rank = adapter.get("r")
    if adapter.get("peft_type") != "LORA" or not isinstance(rank, int) or not 1 <= rank <= LORA_RANK_SLOTS[-1]:
        raise ServeInputError(f"serve.adapter: {path} is not a LoRA adapter of rank 1..{LORA_RANK_SLOTS[-1]} "
                              f"(peft_type {adapter.get('peft_type')}, r {rank})")
    return rank


def resolve_served(cfg: ServeJobConfig, download_dir: Path) -> Served:
    """What the config asks to serve, checked before anything heavy starts. Raises ServeInputError or
    ModelNotFoundError with one line. Run artifacts are downloaded into ``download_dir``."""
    from rayalign.models import resolve_model

    if cfg.serve.run_id:
        return _from_run(cfg.serve.run_id, download_dir)
    model_path = resolve_model(cfg.model.name)
    if (Path(model_path) / "adapter_config.json").is_file() and not (Path(model_path) / "config.json").is_file():
        raise ServeInputError(f"model.name: {cfg.model.name} is a LoRA adapter, not a model; serve it with "
                              f"serve.adapter={cfg.model.name}")
    if not cfg.serve.adapter:
        return Served(model_path, None, 0, cfg.model.name)
    adapter = Path(cfg.serve.adapter).expanduser().resolve()
    return Served(model_path, adapter, check_adapter(adapter), adapter.parent.name + "/" + adapter.name)


def _from_run(run_id: str, download_dir: Path) -> Served:
    import mlflow
    from mlflow.exceptions import MlflowException

    from rayalign.models import resolve_model
    from rayalign.config import redact_url
    from rayalign.tracking import tracking_uri

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ServeInputError(f"serve.run_id: there is no MLflow store at {redact_url(uri)} "
                              f"(set MLFLOW_TRACKING_URI)")
    client = mlflow.MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ServeInputError(f"serve.run_id: no MLflow run {run_id} in {redact_url(uri)}") from None
        raise ServeInputError(f"serve.run_id: could not read run {run_id} from {redact_url(uri)}: "
                              f"{e.message.splitlines()[0]}") from None
    saved = {a.path for a in client.list_artifacts(run_id, "model")}
    name = run.info.run_name or run_id
    if "model/adapter" in saved:
        adapter = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model/adapter",
                                                           dst_path=str(download_dir), tracking_uri=uri))
        base = run.data.params.get("model.name") or C.ModelConfig().name
        return Served(resolve_model(base), adapter, check_adapter(adapter), name)
    if "model/merged" in saved:
        merged = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model/merged",
                                                     dst_path=str(download_dir), tracking_uri=uri)
        return Served(merged, None, 0, name)
    raise ServeInputError(f"serve.run_id: run {run_id} has no model/adapter or model/merged artifacts "
                          "(only a finished jobs/ppo.py run saves a model)")


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

    from rayalign.models import ModelNotFoundError

    local_ray = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    download_dir = Path(tempfile.mkdtemp(prefix="rayalign-serve-"))
    try:
        try:
            served = resolve_served(cfg, download_dir)
            if local_ray and _port_in_use(cfg.serve.host, cfg.serve.port):
                raise ServeInputError(f"serve.port: {cfg.serve.host}:{cfg.serve.port} is already in use")
        except (ServeInputError, ModelNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        serve(cfg, served)
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)
    return 0


def serve(cfg: ServeJobConfig, served: Served) -> None:
    """Start the engines and the route, wait, take everything down again (also on Ctrl-C)."""
    import ray

    from rayalign.resources import init_ray
    from rayalign.rollout.group import RolloutGroup
    from rayalign.rollout.serve import start_chat_server, stop_chat_server
    from rayalign.rollout.weight_sync import lora_payload

    # Ctrl-C and `kill` both stop cleanly, also where the launcher left SIGINT ignored (a background job of a script)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    engines, routed = None, False
    try:
        init_ray(cfg.ray)
        t0 = time.perf_counter()
        rank_slot = next((s for s in LORA_RANK_SLOTS if s >= served.lora_rank), LORA_RANK_SLOTS[-1])
        engines = RolloutGroup(served.model_path, cfg.model, cfg.engine, name="serve",
                               transport="lora" if served.adapter else "none", max_lora_rank=rank_slot)
        if served.adapter:
            engines.publish(lora_payload(engines.next_version(), served.adapter))
            engines.sync()
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
