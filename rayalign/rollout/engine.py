"""A vLLM engine wrapped for Ray: one object per engine process, a few large calls.

`VLLMEngine` is a plain class; the driver launches it as a Ray actor with options from
`rayalign.resources.engine_actor_options`. vLLM is imported inside the actor, never by `import rayalign`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from rayalign.config import EngineConfig, ModelConfig, SamplingConfig
from rayalign.weights.shm import current_node, local_buckets, remove_files, sweep_stale_files
from rayalign.weights.store import Published, write_adapter_files
from rayalign.types import Rollout


def vllm_kwargs(model_path: str, dtype: str, engine: EngineConfig, **extra: Any) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for one engine (rollout or judge) from its config."""
    from rayalign.resources import engine_dtype

    kwargs: dict[str, Any] = dict(model=model_path, dtype=engine_dtype(dtype, engine.num_gpus),
                                  tensor_parallel_size=engine.tensor_parallel_size,
                                  max_model_len=engine.max_model_len, enforce_eager=engine.enforce_eager, **extra)
    if engine.num_gpus > 0:
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
    return kwargs


class EngineBehindError(RuntimeError):
    """The engine cannot generate with the version asked for: it could not pull it (a restarted engine under the
    broadcast transport waits for the group to push it again)."""


class VLLMEngine:
    """One vLLM `LLM`; `generate` returns `Rollout`s tagged with the policy version they were sampled with.

    With ``store_name`` set, the engine follows the `WeightStore` of that name: it applies the latest published
    version in its constructor (so a restarted engine comes back current) and whenever asked for a newer one.
    Versions that were broadcast (`join_weight_group`, `receive`) cannot be pulled: a restarted engine then holds
    version -1 and refuses work (`EngineBehindError`) until its group pushes the current version again.
    """

    def __init__(self, model_path: str, model: ModelConfig, engine: EngineConfig, engine_id: int = 0, *,
                 enable_lora: bool = False, max_lora_rank: int = 16, store_name: str | None = None,
                 namespace: str | None = None):
        from vllm import LLM

        started = time.perf_counter()
        sweep_stale_files()  # this node's weight files left by killed jobs
        kwargs = vllm_kwargs(
            model_path, model.dtype, engine,
            trust_remote_code=model.trust_remote_code,
            enable_lora=enable_lora,
            # Logprobs of the distribution actually sampled from (after temperature), which is what the
            # learner's importance ratios need.
            logprobs_mode="processed_logprobs",
            worker_extension_cls="rayalign.weights.extension.WorkerExtension",
        )
        if enable_lora:
            kwargs.update(max_lora_rank=max_lora_rank, max_loras=1)
        self.llm = LLM(**kwargs)
        self.engine_id = engine_id
        self.policy_version = 0
        self._lora_request: Any = None
        self._lora_root = Path(tempfile.mkdtemp(prefix=f"rayalign-lora-e{engine_id}-"))
        self._store = None
        if store_name is not None:
            import ray

            self._store = ray.get_actor(store_name, namespace=namespace)
            self.sync()
        self.start_seconds = time.perf_counter() - started

    def info(self) -> dict[str, Any]:
        import os

        return {"engine_id": self.engine_id, "policy_version": self.policy_version,
                "start_seconds": self.start_seconds, "pid": os.getpid(), "node_id": current_node()}

    def sync(self) -> dict[str, Any]:
        """Apply the store's latest version if this engine is behind. Returns what was done and how long it took."""
        import ray

        t0 = time.perf_counter()
        if self._store is None:
            raise RuntimeError("this engine follows no weight store (start it with store_name=...)")
        if ray.get(self._store.latest_version.remote()) == self.policy_version:  # cheap check before the payload
            return self._report(t0, applied=False)
        published: Published = ray.get(self._store.latest.remote())
        copied = 0
        if published.route == "broadcast":  # nothing to pull: the group pushes it again (`RolloutGroup.push`)
            self.policy_version = -1  # no version at all meanwhile: generate and chat refuse
            return self._report(t0, applied=False)
        if published.format == "adapter":
            self._apply_adapter(published)
        elif published.format == "full":
            copied = self._apply_full(published)
        else:
            raise ValueError(f"cannot apply a published version of format {published.format!r}")
        self.policy_version = published.version
        return self._report(t0, applied=True, copied_bytes=copied)

    def _report(self, t0: float, applied: bool, copied_bytes: int = 0) -> dict[str, Any]:
        """What `sync` and `receive` answer: the version now held, whether it changed, the seconds since ``t0``
        and the bytes first copied from another node."""
        return {"version": self.policy_version, "applied": applied, "seconds": time.perf_counter() - t0,
                "copied_bytes": copied_bytes}

    def _apply_adapter(self, published: Published) -> None:
        from vllm.lora.request import LoRARequest

        if not self.llm.llm_engine.vllm_config.lora_config:
            raise RuntimeError("an adapter version was published but this engine was started without enable_lora")
        path = write_adapter_files(published, self._lora_root)
        request = LoRARequest(f"policy-v{published.version}", published.version, str(path))
        self.llm.llm_engine.add_lora(request)
        old, self._lora_request = self._lora_request, request
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)

    def _apply_full(self, published: Published) -> int:
        """Load a full-weights version; returns the bytes copied from another node first (0 on the writer's)."""
        readable, copies = local_buckets(published.buckets)
        try:
            self.llm.collective_rpc("rayalign_load_buckets", args=([b.as_lists() for b in readable],))
        finally:
            remove_files(copies)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        return sum(b.nbytes for b in readable if b.path in copies)

    def join_weight_group(self, host: str, port: int, first_rank: int, world_size: int, backend: str) -> None:
        """Join a broadcast weight group: this engine's workers take ranks ``first_rank``, ``first_rank`` + 1, ..."""
        self.llm.collective_rpc("rayalign_join_group", args=(host, port, first_rank, world_size, backend))

    def receive(self, version: int) -> dict[str, Any]:
        """Take version ``version`` from the weight group's sender (who broadcasts it meanwhile)."""
        t0 = time.perf_counter()
        try:
            received = self.llm.collective_rpc("rayalign_receive")
        except BaseException:
            self.policy_version = -1  # some layers may hold the new weights already: no version until a push
            raise
        self.llm.reset_prefix_cache()
        self.policy_version = version
        return {**self._report(t0, applied=True), "received_bytes": received[0]}

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig, *, version: int | None = None,
                 chat: bool = True) -> list[Rollout]:
        """Sample ``sampling.n`` responses per prompt (prompt-major order) with policy ``version`` (None: current)."""
        if version is not None and version != self.policy_version:
            self.sync()
            if version != self.policy_version:
                raise EngineBehindError(f"engine {self.engine_id} asked for policy v{version} but holds "
                                        f"v{self.policy_version}")
        params = self._sampling_params(sampling)
        if chat:
            conversations = [[{"role": "user", "content": p}] for p in prompts]
            outputs = self.llm.chat(conversations, params, use_tqdm=False, lora_request=self._lora_request)
        else:
            outputs = self.llm.generate(list(prompts), params, use_tqdm=False, lora_request=self._lora_request)
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

    def chat(self, messages: list[dict[str, str]], sampling: SamplingConfig) -> dict[str, Any]:
        """One multi-turn chat completion with the current policy (for the HTTP route)."""
        if self.policy_version < 0:
            raise EngineBehindError(f"engine {self.engine_id} restarted and holds no policy version until the "
                                    f"learner pushes the current one (at the next generate or sync)")
        from vllm.exceptions import VLLMClientError

        try:
            out = self.llm.chat([messages], self._sampling_params(sampling), use_tqdm=False,
                                lora_request=self._lora_request)[0]
        except VLLMClientError as e:  # the request's fault (e.g. longer than max_model_len): a ValueError to callers
            raise ValueError(str(e)) from None
        sample = out.outputs[0]
        return {"text": sample.text, "finish_reason": str(sample.finish_reason),
                "prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(sample.token_ids),
                "policy_version": self.policy_version, "engine_id": self.engine_id}

    @staticmethod
    def _sampling_params(sampling: SamplingConfig) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
            ignore_eos=sampling.ignore_eos,
            logprobs=0,  # the sampled token's own logprob
        )
