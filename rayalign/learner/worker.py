"""The commands a learner rank runs for the driver: restore, forward, train, publish, broadcast, checkpoint, save.

Each Ray Train worker builds one `LearnerWorker` (its models from `rayalign.learner.model`, the objective from
`rayalign.learner.objectives`) and runs the driver's commands on it (`rayalign.learner.loop`). Every rank runs every
command; rank 0 alone writes published weights and the final model. Under ZeRO-3 each rank holds a shard of every
weight, so exporting weights is collective (`rayalign.learner.export`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

DRIVER_STATE = "driver_state.json"
DS_TAG = "deepspeed"


class LearnerWorker:
    def __init__(self, spec: dict[str, Any]):
        import ray.train
        import torch

        from rayalign.config import AlgorithmConfig, LearnerConfig
        from rayalign.learner.model import build
        from rayalign.learner.objectives import objective

        self.spec = spec
        self.learner: LearnerConfig = spec["learner"]
        self.algo: AlgorithmConfig = spec["algorithm"]
        self.objective = objective(spec.get("objective") or self.algo.name)
        self.uses_reference = self.objective.uses_reference(self.algo)  # none for RL with a KL coefficient of 0
        # paired objectives: each pair's prompt runs once in every forward (`rayalign.learner.shared_prompt`)
        self.shared_prompt = self.objective.rows_per_example == 2 and self.learner.shared_prompt
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if ctx.get_local_rank() == 0:
            from rayalign.weights.shm import sweep_stale_files

            sweep_stale_files()  # this node's weight files left by killed jobs (rank 0 writes new ones)
        if self.learner.num_gpus_per_worker == 0:
            threads = self.learner.torch_threads or max(1, (os.cpu_count() or 1) // self.learner.num_workers)
            torch.set_num_threads(threads)
        torch.manual_seed(spec["seed"] + self.rank)
        self.model = build(spec["model_path"], self.learner, spec["lora"], self.algo.minibatch_size, self.world,
                             head=self.objective.head,
                             with_reference=self.uses_reference)
        self.device = self.model.device

    def setup(self) -> dict[str, Any]:
        """Restore the checkpoint Ray Train hands this run (if any); rank 0 returns the driver's saved state."""
        import ray.train
        import torch

        # the driver names the checkpoint to resume from; Ray Train's own (after a worker restart) is the fallback
        resume_from = self.spec.get("resume_from")
        checkpoint = ray.train.Checkpoint(resume_from) if resume_from else ray.train.get_checkpoint()
        state = None
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                _, client = self.model.engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=False,
                                                              load_lr_scheduler_states=True)
                if client and "rng" in client:
                    torch.set_rng_state(client["rng"][self.rank % len(client["rng"])])
                state = json.loads((Path(d) / DRIVER_STATE).read_text()) if self.rank == 0 else None
        params = list(self.model.policy.parameters())
        # ds_numel: a ZeRO-3 parameter's full size (the local tensor is this rank's shard)
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad)
        reference = list(self.model.reference.parameters()) if self.model.reference is not None else []
        return {"driver_state": state, "trainable_params": trainable, "rank": self.rank, "pid": os.getpid(),
                "threads": torch.get_num_threads(), "malloc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                "params": sum(getattr(p, "ds_numel", p.numel()) for p in params),
                "params_on_rank": sum(getattr(p, "ds_tensor", p).numel() for p in params),
                "reference_params_on_rank": sum(getattr(p, "ds_tensor", p).numel() for p in reference)}

    def forward(self, batch_ref: Any, rows: list[int], temperature: float, policy: bool = True) -> dict[str, Any]:
        """Old-policy logprobs, reference logprobs and values (B_rank, T) for ``rows`` of the batch (those >= 0;
        -1 rows are padding, computed and dropped), no gradients. ``policy=False``: the reference's alone."""
        import ray
        import torch

        from rayalign.learner.batch import pad_to, select_rows, trim
        from rayalign.learner.model import policy_forward, reference_logprobs

        t0 = time.perf_counter()
        batch = ray.get(batch_ref)
        tokens = batch["response_mask"].shape[1]
        out: dict[str, list] = {"logprobs": [], "ref_logprobs": [], "values": []}
        # micro_batch_size counts examples: a paired objective's micro-batch holds twice as many rows
        micro = self.learner.micro_batch_size * self.objective.rows_per_example
        self.model.engine.eval()
        with torch.no_grad():
            for start in range(0, len(rows), micro):
                mb = trim(select_rows(batch, rows[start:start + micro]))
                if policy:
                    logprobs, values, _ = policy_forward(self.model, mb, temperature, self.shared_prompt,
                                                          with_logits=False)
                    out["logprobs"].append(pad_to(logprobs.float().cpu(), tokens))
                    if values is not None:
                        out["values"].append(pad_to(values.cpu(), tokens))
                if self.uses_reference:
                    ref = reference_logprobs(self.model, mb, temperature, self.shared_prompt)
                    out["ref_logprobs"].append(pad_to(ref.float().cpu(), tokens))
        self.model.engine.train()
        real = torch.tensor([r >= 0 for r in rows], dtype=torch.bool)
        return {**{k: torch.cat(v)[real] if v else None for k, v in out.items()},
                "seconds": time.perf_counter() - t0}

    def train(self, batch_ref: Any, plan: list, temperature: float, kl_coef: float,
              single_pass: bool = False, update: bool = True, policy_is_reference: bool = False) -> dict[str, Any]:
        """Updates over the driver's plan (``plan[minibatch][rank][micro]`` = row indices) with this learner's
        objective: each micro-batch's mean loss is scaled by its share of the minibatch (`token_share`), so one
        optimizer step minimises the mean over the whole minibatch, padding rows included as zeros.

        ``single_pass``: the plan is one optimizer step on freshly sampled rows and the batch carries no
        ``logprobs`` / ``ref_logprobs`` (the driver skipped `forward`). The old policy is then the current one:
        its logprobs are this pass's own, detached (ratio 1, the gradient unchanged), and the reference
        logprobs are computed here, micro-batch by micro-batch. The reply adds ``rows``, ``logprobs`` and
        ``ref_logprobs`` (this rank's rows, as `forward` would have returned them) for the driver's KL figures.

        ``update=False``: the same pass and statistics without gradients or optimizer steps (evaluation).

        ``policy_is_reference``: the policy has not been updated yet (a fresh run's first step), so it is the
        reference: each row's ``ref_logps`` (summed response logprobs) are its own, detached, and the reply adds
        ``rows`` and ``ref_logps`` ((rows, 1)) for the driver to keep. (An offline objective's reference pass can
        then skip the first step's rows.)
        """
        import ray
        import torch

        from rayalign.learner.batch import pad_to, select_rows, trim
        from rayalign.learner.model import forward_outputs, reference_logprobs
        from rayalign.learner.objectives import token_share

        if single_pass and len(plan) != 1:
            raise ValueError(f"single_pass needs a plan of exactly one optimizer step, got {len(plan)}")
        if policy_is_reference and (single_pass or len(plan) != 1):
            raise ValueError("policy_is_reference needs one optimizer step, without single_pass")
        batch = ray.get(batch_ref)
        objective, engine = self.objective, self.model.engine
        settings = objective.settings(self.algo, kl_coef)
        row_weights = objective.row_weights(batch, settings)
        accumulation = len(plan[0][0]) if plan else 1
        sums: dict[str, float] = {}
        seen_units = 0.0
        grad_norms = []
        seen: dict[str, list] = {"rows": [], "logprobs": [], "ref_logprobs": [], "ref_logps": []}
        for minibatch in plan:
            rows = [r for part in minibatch for micro in part for r in micro if r >= 0]
            minibatch_units = float(row_weights[rows].sum()) if rows else 0.0
            for micro_rows in minibatch[self.rank]:
                mb = {k: v.to(self.device) for k, v in trim(select_rows(batch, micro_rows)).items()}
                if single_pass and self.uses_reference:
                    with torch.no_grad():
                        mb["ref_logprobs"] = reference_logprobs(self.model, mb, temperature, self.shared_prompt)
                with torch.set_grad_enabled(update):
                    outputs = forward_outputs(self.model, mb, temperature, self.shared_prompt)
                logprobs = outputs.logprobs
                if policy_is_reference:
                    mb["ref_logps"] = (logprobs.detach() * mb["response_mask"]).sum(dim=1)
                    real = [i for i, r in enumerate(micro_rows) if r >= 0]
                    seen["rows"] += [micro_rows[i] for i in real]
                    seen["ref_logps"].append(mb["ref_logps"][real][:, None].float().cpu())
                if single_pass:
                    mb["logprobs"] = logprobs.detach()
                    real = [i for i, r in enumerate(micro_rows) if r >= 0]
                    seen["rows"] += [micro_rows[i] for i in real]
                    tokens = batch["response_mask"].shape[1]
                    seen["logprobs"].append(pad_to(mb["logprobs"][real].float().cpu(), tokens))
                    if "ref_logprobs" in mb:
                        seen["ref_logprobs"].append(pad_to(mb["ref_logprobs"][real].float().cpu(), tokens))
                with torch.set_grad_enabled(update):
                    loss, units, stats = objective.loss(outputs, mb, settings)
                if update:
                    engine.backward(loss * token_share(units, minibatch_units, accumulation, self.world))
                    engine.step()
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * units
                seen_units += units
            norm = engine.get_global_grad_norm() if update else None
            if norm is not None:
                grad_norms.append(float(norm))
        out = {k: v / seen_units for k, v in sums.items()} if seen_units else {}
        out["tokens"] = seen_units  # the objective's units: response tokens, pairs or examples
        out["optimizer_steps"] = float(len(plan)) if update else 0.0
        if grad_norms:
            out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["lr"] = float(engine.get_lr()[0])
        if policy_is_reference:
            out.update(rows=seen["rows"], ref_logps=torch.cat(seen["ref_logps"]) if seen["ref_logps"] else None)
        if single_pass:
            out.update(rows=seen["rows"], logprobs=torch.cat(seen["logprobs"]) if seen["logprobs"] else None,
                       ref_logprobs=torch.cat(seen["ref_logprobs"]) if seen["ref_logprobs"] else None)
        return out

    def weight_group_address(self) -> tuple[str, int, str] | None:
        """Rank 0: where a new broadcast weight group meets (a store served from here) and its backend."""
        from rayalign.weights.broadcast import serve_store

        if self.rank != 0:
            return None
        self._weight_store = serve_store()
        return self._weight_store.host, self._weight_store.port, "nccl" if self.device.type == "cuda" else "gloo"

    def join_weight_group(self, host: str, port: int, world_size: int, backend: str) -> None:
        """Rank 0 joins the broadcast weight group as its sender (rank 0); a group joined before is dropped."""
        from rayalign.weights.broadcast import open_group

        if self.rank == 0:
            self._weight_group = None
            self._weight_group = (open_group(host, port, 0, world_size, backend, store=self._weight_store), backend)

    def publish(self, store_name: str, namespace: str, version: int, format: str, dtype: str) -> dict[str, Any]:
        """Publish the current policy as version ``version`` into the engines' weight store, as its adapter
        (``format`` "adapter") or its full weights ("full"). Rank 0 publishes; under ZeRO-3 every rank takes part
        in gathering the weights."""
        import ray

        from rayalign.learner.export import publish_to_store

        t0 = time.perf_counter()
        sent = publish_to_store(self.model, self.rank, lambda: ray.get_actor(store_name, namespace=namespace),
                                version, format, _torch_dtype(dtype))
        return {"seconds": time.perf_counter() - t0, "bytes": sent} if self.rank == 0 else {}

    def broadcast(self, version: int, dtype: str) -> dict[str, Any]:
        """Broadcast the current policy's full weights to the weight group, whose engines receive them meanwhile.
        A failed broadcast (an engine died midway) is answered as ``error``: the driver retries, the learner
        goes on."""
        from rayalign.learner.export import drain, export_weights
        from rayalign.weights import broadcast

        t0 = time.perf_counter()
        weights = export_weights(self.model)
        if self.rank != 0:
            drain(weights)  # the other ranks' part of each layer's gather
            return {}
        try:
            if getattr(self, "_weight_group", None) is None:
                raise RuntimeError("rank 0 has joined no weight group (join_weight_group first)")
            sent = broadcast.send(*self._weight_group, weights, dtype=_torch_dtype(dtype))
        except Exception as e:
            drain(weights)  # the other ranks' gathers (ZeRO-3) go on to the end
            return {"error": f"{type(e).__name__}: {e}"}
        return {"seconds": time.perf_counter() - t0, "bytes": sent}

    def checkpoint(self, step: int, driver_state: dict[str, Any]) -> dict[str, Any]:
        """Every rank saves its DeepSpeed state (rank 0 also the driver's) and reports it to Ray Train, which
        merges the ranks' files into one checkpoint directory in storage."""
        import tempfile

        import ray.train
        import torch
        from ray.train import Checkpoint

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="rayalign-ckpt-") as d:
            rng = [torch.get_rng_state()]
            self.model.engine.save_checkpoint(d, tag=DS_TAG, client_state={"rng": rng},
                                              exclude_frozen_parameters=self.learner.finetune == "lora")
            if self.rank == 0:
                (Path(d) / DRIVER_STATE).write_text(json.dumps(driver_state))
            ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"checkpoint_{step:06d}")
        return {"seconds": time.perf_counter() - t0}

    def save(self, output_dir: str, tokenizer_path: str) -> dict[str, Any]:
        """Rank 0 saves the final policy in HF format (adapter, merged model, value head); see `save_model`."""
        from rayalign.learner.export import save_model

        return save_model(self.model, self.rank, output_dir, tokenizer_path)


def _torch_dtype(name: str) -> Any:
    """The engines' dtype as a torch dtype (None for "auto": send as trained)."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(name)
