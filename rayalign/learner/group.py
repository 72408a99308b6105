"""The driver's handle on the learner: a Ray Train `TorchTrainer` whose workers take commands step by step.

Ray Train owns what it is good at (placing the workers, the torch process group, persisting and restoring
checkpoints in ``storage_path``); the job's driver owns the RL loop. The two meet in `LearnerHub`, a small async
actor: the driver posts a command (``forward``, ``train``, ``publish``, ``broadcast``, ``checkpoint``, ``save``),
every worker runs it and posts its reply, and `Learner` methods return once all ranks have answered (or, from
``forward_async``, a `PendingCommand` to wait on later). Large tensors travel through the object store
(``ray.put`` once per step), never through the hub.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any, Callable

from rayalign.config import AlgorithmConfig, LearnerConfig, LoraConfig, PreferenceConfig


class LearnerError(RuntimeError):
    """A learner worker failed; the message carries its traceback."""


class LearnerHub:
    """Command queues between the driver and the Ray Train workers (an async actor, no CPUs)."""

    def __init__(self, world_size: int):
        self.inboxes = [asyncio.Queue() for _ in range(world_size)]
        self.replies: dict[int, dict[int, Any]] = {}
        self.done: dict[int, asyncio.Event] = {}
        self.failure: str | None = None
        self.failed = asyncio.Event()
        self.world_size = world_size
        self.next_id = 0

    async def post(self, name: str, per_rank_kwargs: list[dict[str, Any]]) -> int:
        command_id, self.next_id = self.next_id, self.next_id + 1
        self.replies[command_id], self.done[command_id] = {}, asyncio.Event()
        for rank, inbox in enumerate(self.inboxes):
            inbox.put_nowait((command_id, name, per_rank_kwargs[rank]))
        return command_id

    async def next(self, rank: int) -> tuple[int, str, dict[str, Any]]:
        return await self.inboxes[rank].get()

    async def reply(self, command_id: int, rank: int, result: Any) -> None:
        self.replies[command_id][rank] = result
        if len(self.replies[command_id]) == self.world_size:
            self.done[command_id].set()

    async def fail(self, rank: int, trace: str, command_id: int | None = None) -> None:
        self.failure = f"learner rank {rank} failed:\n{trace}"
        self.failed.set()

    async def wait(self, command_id: int, timeout_s: float) -> list[Any]:
        """All ranks' replies in rank order; raises if any worker failed, or after ``timeout_s``."""
        done = asyncio.ensure_future(self.done[command_id].wait())
        failed = asyncio.ensure_future(self.failed.wait())
        await asyncio.wait([done, failed], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        for f in (done, failed):
            f.cancel()
        if self.failure is not None:
            raise LearnerError(self.failure)
        if not self.done[command_id].is_set():
            raise LearnerError(f"learner command {command_id} got no reply within {timeout_s:.0f} s")
        replies = self.replies.pop(command_id)
        del self.done[command_id]
        return [replies[r] for r in range(self.world_size)]


def _worker_env(learner: LearnerConfig) -> dict[str, Any]:
    """The workers' runtime env: ``learner.malloc_tunables`` as GLIBC_TUNABLES (read when the process starts), after
    any the job's environment sets (glibc takes the last value of a name)."""
    import os

    tunables = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES", ""), learner.malloc_tunables) if t)
    return {"env_vars": {"GLIBC_TUNABLES": tunables}} if tunables else {}


def _fit(trainer: Any) -> Any:
    return trainer.fit()


class Learner:
    """``learner.num_workers`` DeepSpeed ranks under one Ray Train run named ``run_name`` in ``storage_path``.

    ``resume_from``: a checkpoint directory (or URI) the workers restore before anything else; `setup` then returns
    the driver state saved with it. ``objective``: the name of what the workers minimise
    (`rayalign.learner.objectives.OBJECTIVES`; default: the algorithm's name).
    """

    def __init__(self, model_path: str, *, learner: LearnerConfig, lora: LoraConfig,
                 algorithm: AlgorithmConfig | PreferenceConfig,
                 storage_path: str, run_name: str, seed: int, resume_from: str | None = None,
                 objective: str | None = None, command_timeout_s: float = 3600.0):
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        self.world_size = learner.num_workers
        self.timeout_s = command_timeout_s
        namespace = ray.get_runtime_context().namespace
        hub_name = f"rayalign-learner-hub-{uuid.uuid4().hex[:8]}"
        self.hub = ray.remote(LearnerHub).options(name=hub_name, num_cpus=0).remote(self.world_size)
        use_gpu = learner.num_gpus_per_worker > 0
        resources = {"CPU": learner.num_cpus_per_worker, **learner.resources_per_worker}
        if use_gpu:
            resources["GPU"] = learner.num_gpus_per_worker
        from rayalign.learner.objectives import objective as find_objective

        self.rows_per_example = find_objective(objective or algorithm.name).rows_per_example
        spec = {"model_path": model_path, "learner": learner, "lora": lora, "algorithm": algorithm, "seed": seed,
                "objective": objective or algorithm.name, "hub_name": hub_name, "namespace": namespace,
                "resume_from": resume_from}
        trainer = TorchTrainer(
            train_loop_per_worker=_train_loop,
            train_loop_config=spec,
            # one placement group for the workers, packed onto as few nodes as hold them (NCCL within a node)
            scaling_config=ScalingConfig(num_workers=self.world_size, use_gpu=use_gpu,
                                         resources_per_worker=resources, placement_strategy="PACK",
                                         accelerator_type=learner.accelerator_type or None),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(name=run_name, storage_path=storage_path,
                                 worker_runtime_env=_worker_env(learner)),
        )
        # fit() blocks until the workers return, so it runs as a task while the driver sends commands
        self.fit_ref = ray.remote(_fit).options(num_cpus=0).remote(trainer)

    def _submit(self, name: str, per_rank_kwargs: list[dict[str, Any]] | None = None,
                **kwargs: Any) -> "PendingCommand":
        """Post a command to every rank and return at once; `PendingCommand.result` waits for the replies."""
        import ray

        per_rank = per_rank_kwargs or [kwargs] * self.world_size
        command_id = ray.get(self.hub.post.remote(name, per_rank))
        return PendingCommand(self, name, self.hub.wait.remote(command_id, self.timeout_s))

    def _call(self, name: str, per_rank_kwargs: list[dict[str, Any]] | None = None, **kwargs: Any) -> list[Any]:
        return self._submit(name, per_rank_kwargs, **kwargs).result()

    def setup(self) -> dict[str, Any]:
        """Wait for the workers to build their engines (and restore the run's checkpoint, if any).
        Returns rank 0's answer: ``driver_state`` (None on a fresh run), ``trainable_params``, ``threads``,
        ``malloc_tunables`` (its GLIBC_TUNABLES),
        ``params``, ``params_on_rank`` (the elements rank 0 holds: fewer than ``params`` under ZeRO-3) and
        ``reference_params_on_rank`` (those of the frozen reference of a full finetune, sharded too under ZeRO-3)."""
        return self._call("setup")[0]

    def forward(self, batch_ref: Any, num_rows: int, temperature: float, policy: bool = True) -> dict[str, Any]:
        """Old logprobs, reference logprobs and values for every row, computed by all ranks in parallel
        (``policy=False``: the reference's logprobs alone), and ``seconds``, the slowest rank's pass."""
        return self.forward_async(batch_ref, num_rows, temperature, policy).result()

    def forward_async(self, batch_ref: Any, num_rows: int, temperature: float,
                      policy: bool = True) -> "PendingCommand":
        """`forward`, started: the driver does other work (judging) meanwhile, then takes ``.result()``."""
        # round-robin over ranks, by example: a pair's two rows stay on one rank (and share their prompt's pass)
        k = self.rows_per_example if num_rows % self.rows_per_example == 0 else 1
        shards = [[row for e in range(r, num_rows // k, self.world_size) for row in range(e * k, (e + 1) * k)]
                  for r in range(self.world_size)]
        # every rank runs as many forward passes (padding rows, -1, fill the short shards): under ZeRO-3 each
        # forward gathers the weights from all ranks, so a rank with one micro-batch fewer would hang the others
        padded = [rows + [-1] * (len(shards[0]) - len(rows)) for rows in shards]
        pending = self._submit("forward", [{"batch_ref": batch_ref, "rows": rows, "temperature": temperature,
                                            "policy": policy} for rows in padded])
        def gather(replies: list[dict[str, Any]]) -> dict[str, Any]:
            out = _in_row_order(replies, shards, ("logprobs", "ref_logprobs", "values"))
            return {**out, "seconds": max(r["seconds"] for r in replies)}  # the slowest rank's pass

        return dataclasses.replace(pending, gather=gather)

    def train(self, batch_ref: Any, plan: list, temperature: float, kl_coef: float = 0.0,
              single_pass: bool = False, update: bool = True,
              policy_is_reference: bool = False) -> tuple[dict[str, float], dict[str, Any] | None]:
        """One step's updates. Returns the statistics averaged over ranks (weighted by the objective's units:
        tokens, pairs) and, with ``single_pass`` (see `LearnerWorker.train`), the ``logprobs`` and ``ref_logprobs``
        of every row in row order, as `forward` would have given them; with ``policy_is_reference``, every row's
        ``ref_logps`` (B,); otherwise None. ``update=False``: the statistics alone, no gradients (evaluation)."""
        replies = self._call("train", batch_ref=batch_ref, plan=plan, temperature=temperature, kl_coef=kl_coef,
                             single_pass=single_pass, update=update, policy_is_reference=policy_is_reference)
        seen = None
        if single_pass:
            seen = _in_row_order(replies, [r.pop("rows") for r in replies], ("logprobs", "ref_logprobs"))
        if policy_is_reference:
            seen = _in_row_order(replies, [r.pop("rows") for r in replies], ("ref_logps",))
            seen["ref_logps"] = seen["ref_logps"][:, 0]
        tokens = sum(r.get("tokens", 0.0) for r in replies) or 1.0
        keys = {k for r in replies for k in r} - {"tokens", "optimizer_steps", "lr", "grad_norm", "logprobs",
                                                  "ref_logprobs", "ref_logps"}
        stats = {k: sum(r.get(k, 0.0) * r.get("tokens", 0.0) for r in replies) / tokens for k in keys}
        stats.update(optimizer_steps=replies[0]["optimizer_steps"], lr=replies[0]["lr"])
        if "grad_norm" in replies[0]:
            stats["grad_norm"] = replies[0]["grad_norm"]
        return stats, seen

    def publish(self, store_name: str, version: int, format: str, dtype: str) -> dict[str, Any]:
        """Publish the policy as ``version`` to the `WeightStore` named ``store_name`` (in this job's namespace):
        ``format`` "adapter" or "full" (`rayalign.weights.SyncPlan`), in the engines' ``dtype``. Returns rank 0's
        ``seconds`` and ``bytes``."""
        import ray

        namespace = ray.get_runtime_context().namespace
        return self._call("publish", store_name=store_name, namespace=namespace, version=version,
                          format=format, dtype=dtype)[0]

    def weight_sender(self, dtype: str) -> "BroadcastSender":
        """This learner as the sender of a broadcast weight group (see `RolloutGroup.push`), sending in ``dtype``."""
        return BroadcastSender(self, dtype)

    def checkpoint(self, step: int, driver_state: dict[str, Any]) -> float:
        t0 = time.perf_counter()
        self._call("checkpoint", step=step, driver_state=driver_state)
        return time.perf_counter() - t0

    def save(self, output_dir: str, tokenizer_path: str) -> dict[str, str]:
        return self._call("save", output_dir=output_dir, tokenizer_path=tokenizer_path)[0]

    def shutdown(self) -> None:
        """Stop the workers and wait for the Ray Train run to finish."""
        import ray

        try:
            self._call("stop")
            ray.get(self.fit_ref, timeout=300)
        finally:
            ray.kill(self.hub, no_restart=True)


@dataclasses.dataclass
class BroadcastSender:
    """The learner's rank 0 as rank 0 of a broadcast weight group (a `rayalign.weights.WeightSender`)."""

    learner: Learner
    dtype: str

    def address(self) -> tuple[str, int, str]:
        return self.learner._call("weight_group_address")[0]

    def join(self, host: str, port: int, world_size: int, backend: str) -> None:
        self.learner._call("join_weight_group", host=host, port=port, world_size=world_size, backend=backend)

    def send(self, version: int) -> int:
        reply = self.learner._call("broadcast", version=version, dtype=self.dtype)[0]
        if "error" in reply:
            raise RuntimeError(f"learner rank 0 could not broadcast v{version}: {reply['error']}")
        return reply["bytes"]


@dataclasses.dataclass(frozen=True)
class PendingCommand:
    """A command every learner rank is running; `result` waits for all replies (or the run's failure)."""

    learner: Learner
    name: str
    wait_ref: Any
    gather: Callable[[list[Any]], Any] | None = None
    """Turns the ranks' replies into the result (None: the list of replies, in rank order)."""

    def result(self) -> Any:
        import ray

        ready, _ = ray.wait([self.wait_ref, self.learner.fit_ref], num_returns=1)
        if ready[0] == self.learner.fit_ref and not ray.wait([self.wait_ref], timeout=1.0)[0]:
            ray.get(self.learner.fit_ref)  # raises the trainer's own error
            raise LearnerError(f"the Ray Train run ended before answering '{self.name}'")
        replies = ray.get(self.wait_ref)
        return replies if self.gather is None else self.gather(replies)


def _in_row_order(replies: list[dict[str, Any]], rows_per_rank: list[list[int]],
                  keys: tuple[str, ...]) -> dict[str, Any]:
    """Stack the ranks' (rows_r, T) tensors under each key into one (B, T) tensor ordered by row index (None
    where no rank returned the key)."""
    import torch

    rows = [i for part in rows_per_rank for i in part]
    if sorted(rows) != list(range(len(rows))):
        raise ValueError(f"the ranks returned rows {sorted(rows)}, not each of 0..{len(rows) - 1} once")
    order = torch.tensor(rows).argsort()
    out: dict[str, Any] = {}
    for key in keys:
        parts = [r[key] for r in replies if r.get(key) is not None]
        if parts:
            width = max(p.shape[1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts]
            out[key] = torch.cat(parts)[order]
        else:
            out[key] = None
    return out


def _train_loop(spec: dict[str, Any]) -> None:
    from rayalign.learner.loop import train_loop

    train_loop(spec)
