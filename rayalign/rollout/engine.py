"""A vLLM engine wrapped for Ray: one object per engine process, a few large calls.

`VLLMEngine` is a plain class; the driver launches it as a Ray actor with options from
`rayalign.resources.engine_actor_options`. vLLM is imported inside the actor, never by `import rayalign`.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from rayalign.config import EngineConfig, ModelConfig, SamplingConfig
from rayalign.types import Rollout


class VLLMEngine:
    """One vLLM `LLM` in its own process; `generate` returns `Rollout`s tagged with this engine's policy version."""

    def __init__(self, model_path: str, model: ModelConfig, engine: EngineConfig, engine_id: int = 0,
                 enable_lora: bool = False, max_lora_rank: int = 16):
        from vllm import LLM

        started = time.perf_counter()
        kwargs: dict[str, Any] = dict(
            model=model_path,
            dtype=model.dtype,
            tensor_parallel_size=engine.tensor_parallel_size,
            max_model_len=engine.max_model_len,
            enforce_eager=engine.enforce_eager,
            trust_remote_code=model.trust_remote_code,
            enable_lora=enable_lora,
            # Logprobs of the distribution actually sampled from (after temperature), which is what the
            # learner's importance ratios need.
            logprobs_mode="processed_logprobs",
        )
        if enable_lora:
            kwargs["max_lora_rank"] = max_lora_rank
        if engine.num_gpus > 0:
            kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
        self.llm = LLM(**kwargs)
        self.engine_id = engine_id
        self.policy_version = 0
        self.start_seconds = time.perf_counter() - started

    def info(self) -> dict[str, Any]:
        return {"engine_id": self.engine_id, "policy_version": self.policy_version, "start_seconds": self.start_seconds}

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig, *, chat: bool = True) -> list[Rollout]:
        """Sample ``sampling.n`` responses per prompt. Output order: prompt-major, then sample index."""
        from vllm import SamplingParams

        params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
            logprobs=0,  # the sampled token's own logprob
        )
        if chat:
            conversations = [[{"role": "user", "content": p}] for p in prompts]
            outputs = self.llm.chat(conversations, params, use_tqdm=False)
        else:
            outputs = self.llm.generate(list(prompts), params, use_tqdm=False)
        rollouts = []
        for prompt, out in zip(prompts, outputs):
            for sample in out.outputs:
                token_ids = tuple(sample.token_ids)
                logprobs = tuple(step[tok].logprob for step, tok in zip(sample.logprobs or (), token_ids))
                rollouts.append(Rollout(
                    prompt=prompt,
                    response=sample.text,
                    prompt_token_ids=tuple(out.prompt_token_ids),
                    response_token_ids=token_ids,
                    logprobs=logprobs,
                    finish_reason=str(sample.finish_reason),
                    policy_version=self.policy_version,
                    engine_id=self.engine_id,
                ))
        return rollouts


def start_engines(model_path: str, model: ModelConfig, engine: EngineConfig, **engine_kwargs: Any) -> list[Any]:
    """Launch ``engine.num_engines`` engine actors and wait until every one has loaded the model."""
    import ray

    from rayalign.resources import engine_actor_options

    actor_cls = ray.remote(VLLMEngine)
    options = engine_actor_options(engine)
    handles = [
        actor_cls.options(**options, name=None).remote(model_path, model, engine, engine_id=i, **engine_kwargs)
        for i in range(engine.num_engines)
    ]
    ray.get([h.info.remote() for h in handles])
    return handles


def generate(handles: Sequence[Any], prompts: Sequence[str], sampling: SamplingConfig) -> list[Rollout]:
    """Split ``prompts`` into one contiguous chunk per engine, generate in parallel, return them in prompt order."""
    import ray

    chunk = -(-len(prompts) // len(handles))
    futures = [h.generate.remote(prompts[i * chunk:(i + 1) * chunk], sampling)
               for i, h in enumerate(handles) if prompts[i * chunk:(i + 1) * chunk]]
    return [r for part in ray.get(futures) for r in part]
