"""The driver's handle on the rollout engines: spread a batch over all of them, publish and sync weights.

Why actors behind one handle rather than Serve replicas: Serve routes each request to one replica of its choice,
but the driver must reach *every* engine (to split a batch evenly and to sync weights). Engines are Ray actors
that Ray restarts on failure; an engine pulls the latest published version in its constructor, so a restarted
engine is current before it takes work (a broadcast version cannot be pulled: the engine refuses work until
`generate` has the group push it again). HTTP serving of the same engines goes through a light Serve ingress
(`rayalign.rollout.serve`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from rayalign.config import EngineConfig, ModelConfig, SamplingConfig
from rayalign.rollout.engine import EngineBehindError, VLLMEngine
from rayalign.types import Rollout
from rayalign.weights.plan import SyncPlan, WeightSender, WeightSource
from rayalign.weights.store import Published, WeightStore, adapter_payload, broadcast_marker

log = logging.getLogger("rayalign.rollout")


@dataclasses.dataclass(frozen=True)
class SyncReport:
    version: int
    seconds: float
    """Wall time of the whole sync, as the driver saw it."""
    engine_seconds: tuple[float, ...]
    """Time each engine spent applying the version."""
    copied_bytes: tuple[int, ...] = ()
    """Bytes each engine first copied from another node (full weights written where it cannot read them)."""
    sent_bytes: int = 0
    """Bytes the learner sent: published to the store, or broadcast."""


class RolloutGroup:
    """``engine.num_engines`` vLLM engine actors plus the `WeightStore` they follow.

    ``sync_plan``: how new weights will arrive (`SyncPlan`: an adapter, so engines start with LoRA enabled, or full
    weights, pulled from the store by `sync` or broadcast to them by `push`); None for a fixed model (sampling)
    that may still be given an adapter with `load_adapter` when ``max_lora_rank`` is set.
    """

    def __init__(self, model_path: str, model: ModelConfig, engine: EngineConfig, *,
                 sync_plan: SyncPlan | None = None, max_lora_rank: int = 0, name: str = "policy"):
        import ray

        self._suffix = uuid.uuid4().hex[:8]
        self._namespace = ray.get_runtime_context().namespace
        self._name = name
        self._engine_args = (model_path, model, engine)
        enable_lora = bool(max_lora_rank) if sync_plan is None else sync_plan.engines_need_lora
        self._lora_args = {"enable_lora": enable_lora, "max_lora_rank": max_lora_rank or 16}
        self.store_name = f"rayalign-{name}-weights-{self._suffix}"
        self.store = ray.remote(WeightStore).options(name=self.store_name, num_cpus=0).remote()
        self.sync_plan = sync_plan
        self.version = 0
        self.engines: list[Any] = []
        self.engine_names: list[str] = []
        self._sender: WeightSender | None = None
        self._update_sender: tuple[WeightSource, WeightSender] | None = None  # (source, its sender) for `update`
        self._group_pids: list[int] = []  # the engine processes in the broadcast group, in rank order
        self.add_engines(engine.num_engines)

    def add_engines(self, count: int) -> None:
        """Start ``count`` more engines (scaling up). Each applies the latest published version before it is
        handed work; this returns once they have."""
        import ray

        from rayalign.resources import engine_actor_options

        model_path, model, engine = self._engine_args
        total = len(self.engines) + count
        sized = dataclasses.replace(engine, num_engines=total)
        actor_cls = ray.remote(VLLMEngine)
        new = []
        for i in range(len(self.engines), total):
            name = f"rayalign-{self._name}-engine{i}-{self._suffix}"
            new.append(actor_cls.options(**engine_actor_options(sized, i), name=name).remote(
                model_path, model, engine, i, store_name=self.store_name, namespace=self._namespace,
                **self._lora_args))
            self.engine_names.append(name)
        ray.get([e.info.remote() for e in new])  # wait until every new engine has loaded the model
        self.engines.extend(new)
        if self._sender is not None and self.version > 0:  # broadcast: nothing to pull, the group re-forms
            self.push(self.version, self._sender)

    def infos(self) -> list[dict[str, Any]]:
        import ray

        return ray.get([e.info.remote() for e in self.engines])

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig) -> list[Rollout]:
        """Split ``prompts`` into one contiguous chunk per engine; results come back in prompt order, all sampled
        with the current version."""
        import ray

        chunk = -(-len(prompts) // len(self.engines))

        def run() -> list[Rollout]:
            futures = [
                engine.generate.remote(list(prompts[i * chunk:(i + 1) * chunk]), sampling, version=self.version)
                for i, engine in enumerate(self.engines) if prompts[i * chunk:(i + 1) * chunk]
            ]
            return [r for part in ray.get(futures) for r in part]

        try:
            return run()
        except EngineBehindError:
            if self._sender is None:
                raise
            # a restarted engine under the broadcast transport: it cannot pull, so the group re-forms around it
            # and the sender pushes the current version again (the learner's weights are that version's)
            self.push(self.version, self._sender)
            return run()

    def publish(self, published: Published) -> int:
        """Hand a new version to the store (what a learner does through `store_name`)."""
        import ray

        return ray.get(self.store.publish.remote(published))

    def load_adapter(self, adapter_dir: str | Path) -> SyncReport:
        """Serve the peft LoRA adapter in ``adapter_dir`` on every engine (published as the next version, then
        synced): how evaluation and serving apply a trained adapter, exactly as training does."""
        self.publish(adapter_payload(self.next_version(), adapter_dir))
        return self.sync()

    def update(self, version: int, source: WeightSource) -> SyncReport:
        """Send ``source``'s current weights to every engine as ``version``, by this group's `SyncPlan`: published
        to the store and pulled (`sync`), or broadcast (`push`). When this returns, they all generate with it."""
        if self.sync_plan is None:
            raise RuntimeError("this group serves a fixed model (no sync_plan): nothing can update it")
        from rayalign.resources import engine_dtype

        dtype = engine_dtype(self._engine_args[1].dtype, self._engine_args[2].num_gpus)
        if self.sync_plan.route == "broadcast":
            if self._update_sender is None or self._update_sender[0] is not source:
                self._update_sender = (source, source.weight_sender(dtype))
            return self.push(version, self._update_sender[1])
        published = source.publish(self.store_name, version, self.sync_plan.format, dtype)
        return dataclasses.replace(self.sync(), sent_bytes=published.get("bytes", 0))

    def next_version(self) -> int:
        import ray

        return ray.get(self.store.latest_version.remote()) + 1

    def sync(self) -> SyncReport:
        """Bring every engine to the store's latest version; when this returns, they all generate with it."""
        import ray

        t0 = time.perf_counter()
        latest = ray.get(self.store.latest_version.remote())
        results = ray.get([e.sync.remote() for e in self.engines])
        stale = [r["version"] for r in results if r["version"] != latest]
        if stale:
            raise RuntimeError(f"engines still on versions {stale} after syncing to v{latest}")
        self.version = latest
        return SyncReport(latest, time.perf_counter() - t0, tuple(r["seconds"] for r in results),
                          tuple(r["copied_bytes"] for r in results))

    def push(self, version: int, sender: WeightSender) -> SyncReport:
        """Full weights by broadcast: ``sender`` broadcasts its current weights as ``version`` while every engine
        receives them; when this returns, they all generate with it. The group is formed on the first push and
        again whenever its members changed (an engine restarted or added, another sender). A push that fails
        (an engine died midway, say) is tried once more in a group formed afresh."""
        import ray

        if self.sync_plan is None or self.sync_plan.format != "full":
            raise RuntimeError(f"push sends full weights: it needs a sync plan of format 'full' (this group's is "
                               f"{self.sync_plan})")
        latest = ray.get(self.store.latest_version.remote())
        if version < latest:
            raise ValueError(f"cannot push v{version}: the engines' store is at v{latest}")
        t0 = time.perf_counter()
        if version > latest:
            # a marker: engines that Ray restarts see it and wait to be pushed to (they have nothing to pull)
            ray.get(self.store.publish.remote(broadcast_marker(version)))
        for attempt in (1, 2):
            pids = [i["pid"] for i in self.infos()]
            if pids != self._group_pids or sender is not self._sender:
                self._group_pids = []  # until every member has joined the new group
                self._form_group(sender)
                self._group_pids, self._sender = pids, sender
            futures = [e.receive.remote(version) for e in self.engines]
            try:
                sent = sender.send(version)
                results = ray.get(futures)
                break
            except Exception as e:
                self._group_pids = []
                if attempt == 2:
                    raise
                log.warning("pushing v%d failed (%s: %s); trying once more in a new group", version,
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                ray.wait(futures, num_returns=len(futures))  # the engines are done with this attempt
        self.version = version
        return SyncReport(version, time.perf_counter() - t0, tuple(r["seconds"] for r in results),
                          tuple(0 for _ in results), sent)

    def _form_group(self, sender: WeightSender) -> None:
        """Sender = rank 0, then every worker of every engine (``tensor_parallel_size`` each), all joining at once."""
        import ray

        host, port, backend = sender.address()
        per_engine = self._engine_args[2].tensor_parallel_size
        world_size = 1 + per_engine * len(self.engines)
        joins = [e.join_weight_group.remote(host, port, 1 + i * per_engine, world_size, backend)
                 for i, e in enumerate(self.engines)]
        failed, _ = ray.wait(joins, num_returns=len(joins), timeout=0.5)  # none can finish before the sender joins
        ray.get(failed)  # an engine that could not even start joining raises here, not after the group's timeout
        sender.join(host, port, world_size, backend)
        ray.get(joins)

    def shutdown(self) -> None:
        import ray

        for engine in self.engines:
            ray.kill(engine, no_restart=True)
        try:
            ray.get(self.store.close.remote())
        finally:
            ray.kill(self.store, no_restart=True)
