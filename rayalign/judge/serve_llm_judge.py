"""The judge model as a ``ray.serve.llm`` application inside the job (``judge.backend=ray_serve_llm``), scored over
its OpenAI routes by `rayalign.judge.openai_judge.OpenAIJudge` (the same requests, parsing, retries and circuit
breaker as any endpoint).

rayalign's own judge deployment (``judge.backend=vllm``, `rayalign.judge.vllm_judge`) stays the default: it takes
a whole step's pairs in one request and judges them in one vLLM call, and it is what the generation jobs' Ray Data
stages call (``ServeDeploymentProcessorConfig``). README, "The judge, validated", has the two measured side by side.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

from rayalign.config import JudgeConfig, ModelConfig
from rayalign.judge.pairwise import Choice
from rayalign.types import Judgement


class ServeLLMJudge:
    """Deploys the judge as a ``ray.serve.llm`` app on Serve's HTTP proxy (127.0.0.1, a free port unless Serve
    already runs) and judges through it. ``wait=False`` returns at once; the first call waits for the app."""

    def __init__(self, model_path: str, config: JudgeConfig, app_name: str = "rayalign-judge-llm",
                 wait: bool = True):
        from ray import serve
        from ray.serve.context import _get_global_client

        from rayalign.judge.openai_judge import OpenAIJudge
        from rayalign.rollout.serve_llm import build_llm_app, free_port, llm_config

        self.config, self.app_name = config, app_name
        llm = llm_config(model_path, "judge", ModelConfig(dtype=config.dtype),
                         dataclasses.replace(config.engine, num_engines=config.num_replicas))
        if config.max_replicas > config.num_replicas:
            llm["deployment_config"] = {"autoscaling_config": {"min_replicas": config.num_replicas,
                                                               "max_replicas": config.max_replicas}}
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})  # joins a Serve already running
        self._deployed_at = time.perf_counter()
        serve.run(build_llm_app(llm), name=app_name, route_prefix=f"/{app_name}", blocking=False)
        http = _get_global_client().http_config
        self.client = OpenAIJudge(dataclasses.replace(
            config, backend="openai", url=f"http://{http.host}:{http.port}/{app_name}/v1", endpoint_model="judge",
            concurrency=max(config.concurrency, config.max_batch_size)))
        self.start_seconds: float | None = None
        if wait:
            self.wait_until_running()

    def wait_until_running(self) -> float:
        """Block until the app runs; returns the seconds its start took. A failed deploy, or one not running
        within ``judge.start_timeout_s``, raises JudgeUnavailableError naming the app."""
        from rayalign.judge.openai_judge import JudgeUnavailableError
        from rayalign.rollout.serve_llm import wait_running

        if self.start_seconds is None:
            left = self.config.start_timeout_s - (time.perf_counter() - self._deployed_at)
            try:
                wait_running(self.app_name, max(left, 0.0), "judge.start_timeout_s")
            except (RuntimeError, TimeoutError) as e:
                raise JudgeUnavailableError(str(e), partial=[]) from None
            self.start_seconds = time.perf_counter() - self._deployed_at
        return self.start_seconds

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Judgement]:
        self.wait_until_running()
        return self.client.judge(prompts, responses)

    def compare(self, prompts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]) -> list[Choice | None]:
        self.wait_until_running()
        return self.client.compare(prompts, firsts, seconds)

    def shutdown(self) -> None:
        from ray import serve

        serve.delete(self.app_name)
