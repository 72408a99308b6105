"""An OpenAI-compatible chat route (Ray Serve) over the rollout engines, for a look at the policy while it trains.

The route is a light Serve ingress that forwards each request to one engine actor (round robin); it answers with
whatever policy version the engines hold. It binds to 127.0.0.1 unless told otherwise.

    GET  /chat/                     a chat page (rayalign/rollout/chat.html) for a person to try the model
    POST /chat/v1/chat/completions  {"messages": [...], "max_tokens": 64, "temperature": 0.7}
    GET  /chat/v1/models
"""

# No `from __future__ import annotations` here: FastAPI reads the route handlers' annotations at definition time,
# and `Request` is imported inside `build_chat_app` to keep `import rayalign` light.
import time
import uuid
from typing import Any, Sequence

from rayalign.config import SamplingConfig


def _error(status: int, message: str, kind: str = "invalid_request_error") -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind}})


def _last_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


ROUTE_FIELDS = frozenset({"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                          "seed", "stop", "n", "stream", "user"})
"""The OpenAI chat fields this route understands (n only 1, stream only false); any other is refused with 400."""


def _content(i: int, content: Any) -> str:
    """A message's content: a string, or a list of text parts (what many clients send), joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"messages[{i}].content: only text parts are supported, got {kind!r}")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"messages[{i}] must be {{'role': system|user|assistant, 'content': str or text parts}}")


def parse_chat_request(body: Any, defaults: SamplingConfig) -> tuple[list[dict[str, str]], SamplingConfig]:
    """Validate an OpenAI chat request body. Raises ValueError with a one-line reason, also for every field this
    route does not support (streaming, several choices, logprobs, tools...): refused, never silently ignored."""
    import dataclasses

    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    unknown = sorted(set(body) - ROUTE_FIELDS)
    if unknown:
        raise ValueError(f"unsupported request field(s): {', '.join(unknown)} (this route serves the rollout "
                         "engines; jobs/serve.py's default backend, ray_serve_llm, takes the whole OpenAI API)")
    if body.get("stream"):
        raise ValueError("'stream': this route answers whole responses only (serve.backend=ray_serve_llm streams)")
    if body.get("n") not in (None, 1):
        raise ValueError("'n': this route returns one choice per request (serve.backend=ray_serve_llm returns n)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}] must be {{'role': system|user|assistant, 'content': str or text parts}}")
        parsed.append({"role": m["role"], "content": _content(i, m.get("content"))})
    changes: dict[str, Any] = {}
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise ValueError("set one of 'max_tokens' and 'max_completion_tokens'")
    for key, field, kind in (("max_tokens", "max_new_tokens", int), ("max_completion_tokens", "max_new_tokens", int),
                             ("temperature", "temperature", float), ("top_p", "top_p", float), ("seed", "seed", int)):
        if body.get(key) is not None:
            value = body[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
                raise ValueError(f"'{key}' must be a number")
            changes[field] = kind(value)
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
            raise ValueError("'stop' must be a string or a list of up to 4 non-empty strings")
        changes["stop"] = tuple(stop)
    sampling = dataclasses.replace(defaults, n=1, **changes)
    if (sampling.max_new_tokens < 1 or not 0 <= sampling.temperature <= 2 or not 0 < sampling.top_p <= 1
            or sampling.seed is not None and not 0 <= sampling.seed < 2**63):
        raise ValueError("max_tokens must be >= 1, temperature in [0, 2], top_p in (0, 1] and seed in [0, 2^63)")
    return parsed, sampling


def build_chat_app(engine_names: Sequence[str], namespace: str, model_name: str, defaults: SamplingConfig) -> Any:
    """A bound Serve application; run it with `start_chat_server`."""
    import importlib.resources

    import ray
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse
    from ray import serve

    from rayalign.rollout.engine import EngineBehindError

    api = FastAPI(title="rayalign policy")
    page = importlib.resources.files("rayalign.rollout").joinpath("chat.html").read_text()

    @serve.deployment(name="rayalign-chat", num_replicas=1, ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class ChatRoute:
        def __init__(self) -> None:
            self.engines = [ray.get_actor(n, namespace=namespace) for n in engine_names]
            self.turn = 0

        @api.get("/", response_class=HTMLResponse)
        async def chat_page(self) -> str:
            return page

        @api.get("/v1/models")
        async def models(self) -> dict[str, Any]:
            return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "rayalign"}]}

        @api.post("/v1/chat/completions")
        async def chat(self, request: Request) -> Any:
            try:
                messages, sampling = parse_chat_request(await request.json(), defaults)
            except ValueError as e:
                return _error(400, str(e))
            engine = self.engines[self.turn % len(self.engines)]
            self.turn += 1
            try:
                out = await engine.chat.remote(messages, sampling)
            except EngineBehindError as e:  # a restarted engine, until the learner pushes the current policy
                return _error(503, _last_line(e), "unavailable")
            except ValueError as e:  # vLLM's own checks, e.g. a conversation longer than the engine's context
                return _error(400, _last_line(e))
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                             "finish_reason": out["finish_reason"]}],
                "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                          "total_tokens": out["prompt_tokens"] + out["completion_tokens"]},
                "policy_version": out["policy_version"],
            }

    return ChatRoute.bind()


def start_chat_server(engine_names: Sequence[str], *, model_name: str, defaults: SamplingConfig | None = None,
                      host: str = "127.0.0.1", port: int = 8000) -> str:
    """Serve the engines' chat route on ``host:port``; returns the base URL.

    Serve has one HTTP proxy per cluster: if Serve is already running (a judge deployment started it, say), the
    route joins it and the URL returned is where that proxy listens, not ``host:port``."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    namespace = ray.get_runtime_context().namespace
    serve.start(http_options={"host": host, "port": port})
    app = build_chat_app(engine_names, namespace, model_name, defaults or SamplingConfig(temperature=0.7))
    serve.run(app, name="rayalign-chat", route_prefix="/chat")
    http = _get_global_client().http_config
    return f"http://{http.host}:{http.port}/chat"


def stop_chat_server() -> None:
    from ray import serve

    serve.delete("rayalign-chat")
