"""What runs inside each Ray Train worker: a DeepSpeed engine over the policy, serving the driver's commands.

`train_loop` is the ``train_loop_per_worker`` of a `TorchTrainer`. It builds the policy (an HF causal LM, with a
peft LoRA adapter or fully trainable, plus a value head for PPO), wraps it in DeepSpeed (ZeRO stage from config;
on CPU DeepSpeed's CPU accelerator over the gloo group Ray Train set up), restores the latest checkpoint Ray Train
hands it, then waits for commands from the `LearnerHub` actor until told to stop. Every rank runs every command;
rank 0 alone writes published weights and the final model. Under ZeRO-3 each rank holds a shard of every weight,
so exporting weights is collective: all ranks gather one layer at a time (`_export_weights`) and rank 0 keeps it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

DRIVER_STATE = "driver_state.json"
DS_TAG = "deepspeed"


def _build_policy(model_path: str, learner: Any, lora: Any, value_head: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if learner.dtype == "bfloat16" else torch.float32

    class Policy(torch.nn.Module):
        """The LM plus an optional scalar value head on its last hidden state (shared backbone)."""

        def __init__(self, lm: torch.nn.Module, hidden_size: int):
            super().__init__()
            self.lm = lm
            self.value_head = torch.nn.Linear(hidden_size, 1) if value_head else None
            if self.value_head is not None:
                torch.nn.init.normal_(self.value_head.weight, std=1e-3)
                torch.nn.init.zeros_(self.value_head.bias)

        def forward(self, input_ids, attention_mask, logits_to_keep=0):
            """(B, L) -> logits (B, L, V) (the last ``logits_to_keep`` positions only, when > 0),
            hidden (B, L, H) | None."""
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                          output_hidden_states=self.value_head is not None, use_cache=False)
            hidden = out.hidden_states[-1] if self.value_head is not None else None
            return out.logits, hidden

    lm = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=dtype)
    # no dropout: the old-policy pass (eval mode) and the training pass (train mode) must see the same function
    for module in lm.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    if learner.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
        lm.enable_input_require_grads()
    if learner.finetune == "lora":
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        lm = get_peft_model(lm, PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                               target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    return Policy(lm, lm.config.hidden_size)


class LearnerWorker:
    def __init__(self, spec: dict[str, Any]):
        import deepspeed
        import ray.train
        import torch

        from rayalign.config import AlgorithmConfig, LearnerConfig, LoraConfig
        from rayalign.learner.batch import minibatch_plan  # noqa: F401  (import check before any work)

        self.spec = spec
        self.learner: LearnerConfig = spec["learner"]
        self.algo: AlgorithmConfig = spec["algorithm"]
        lora: LoraConfig = spec["lora"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if ctx.get_local_rank() == 0:
            from rayalign.rollout.weight_sync import sweep_stale_files

            sweep_stale_files()  # this node's weight files left by killed jobs (rank 0 writes new ones)
        if self.learner.num_gpus_per_worker == 0:
            threads = self.learner.torch_threads or max(1, (os.cpu_count() or 1) // self.learner.num_workers)
            torch.set_num_threads(threads)
        torch.manual_seed(spec["seed"] + self.rank)

        accumulation = self.algo.minibatch_size // (self.learner.micro_batch_size * self.world)
        ds_config = {
            "train_micro_batch_size_per_gpu": self.learner.micro_batch_size,
            "gradient_accumulation_steps": accumulation,
            "train_batch_size": self.algo.minibatch_size,
            "gradient_clipping": self.learner.max_grad_norm,
            "zero_optimization": {"stage": self.learner.zero_stage},
            "bf16": {"enabled": self.learner.dtype == "bfloat16"},
            "steps_per_print": 1 << 30,
        }
        self.zero3 = self.learner.zero_stage == 3
        hf_zero3 = None
        if self.zero3:
            from transformers.integrations import HfDeepSpeedConfig

            deepspeed.init_distributed()  # on Ray Train's process group; zero.Init checks the batch sizes against it
            # while this object lives, from_pretrained loads each rank's shard only (deepspeed.zero.Init)
            hf_zero3 = HfDeepSpeedConfig(ds_config)
        self.policy = _build_policy(spec["model_path"], self.learner, lora, value_head=self.algo.name == "ppo")
        self.reference = None
        if self.learner.finetune == "full":  # LoRA's reference is the same model with the adapter switched off
            from transformers import AutoModelForCausalLM

            reference = AutoModelForCausalLM.from_pretrained(spec["model_path"], torch_dtype=self.policy.lm.dtype)
            reference.requires_grad_(False)
            if self.zero3:
                # sharded like the policy (loaded under HfDeepSpeedConfig); an engine without an optimizer gathers
                # each layer's weights for its forward and frees them after
                reference, _, _, _ = deepspeed.initialize(model=reference, config={
                    key: ds_config[key] for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                                    "train_batch_size", "zero_optimization", "bf16",
                                                    "steps_per_print")})
            reference.eval()  # (a DeepSpeed engine's eval returns None)
            self.reference = reference
        del hf_zero3

        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.learner.lr, weight_decay=self.learner.weight_decay)
        warmup = self.learner.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        self.engine, _, _, _ = deepspeed.initialize(model=self.policy, optimizer=optimizer,
                                                    lr_scheduler=scheduler, config=ds_config)
        self.device = self.engine.device
        if self.reference is not None and not self.zero3:
            self.reference.to(self.device)  # beside the policy (on GPU; ZeRO-3's engine placed its own)

    def _gathered(self, params: list) -> Any:
        """Whole ``params`` inside the block on every rank (ZeRO-3: a collective all ranks must enter)."""
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)

    # -- commands --------------------------------------------------------------------------------------------

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
                _, client = self.engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=False,
                                                        load_lr_scheduler_states=True)
                if client and "rng" in client:
                    torch.set_rng_state(client["rng"][self.rank % len(client["rng"])])
                state = json.loads((Path(d) / DRIVER_STATE).read_text()) if self.rank == 0 else None
        params = list(self.policy.parameters())
        # ds_numel: a ZeRO-3 parameter's full size (the local tensor is this rank's shard)
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad)
        reference = list(self.reference.parameters()) if self.reference is not None else []
        return {"driver_state": state, "trainable_params": trainable, "rank": self.rank, "pid": os.getpid(),
                "threads": torch.get_num_threads(), "params": sum(getattr(p, "ds_numel", p.numel()) for p in params),
                "params_on_rank": sum(getattr(p, "ds_tensor", p).numel() for p in params),
                "reference_params_on_rank": sum(getattr(p, "ds_tensor", p).numel() for p in reference)}

    def _forward(self, mb: dict[str, Any], temperature: float, reference: bool = False):
        from rayalign.learner.batch import gather_response, logits_from, response_positions, token_logprobs

        input_ids = mb["input_ids"].to(self.device)
        attention_mask = mb["attention_mask"].to(self.device)
        positions = response_positions(mb["response_start"].to(self.device), mb["response_mask"].shape[1],
                                       input_ids.shape[1])
        first = logits_from(positions, mb["response_mask"])
        positions = positions.clamp(min=first)  # moves only padding rows' (masked) positions
        keep = input_ids.shape[1] - first  # logits of the response positions only, not the prompts'
        if reference:
            if self.reference is not None:
                logits = self.reference(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep,
                                        use_cache=False).logits
            else:
                with self.policy.lm.disable_adapter():
                    logits = self.policy.lm(input_ids=input_ids, attention_mask=attention_mask,
                                            logits_to_keep=keep, use_cache=False).logits
            return token_logprobs(logits, input_ids, positions, temperature, first)[0], None, None
        logits, hidden = self.engine(input_ids, attention_mask, logits_to_keep=keep)
        logprobs, selected = token_logprobs(logits, input_ids, positions, temperature, first)
        values = None
        if hidden is not None:
            values = self.policy.value_head(gather_response(hidden, positions)).squeeze(-1).float()
        return logprobs, values, selected

    def forward(self, batch_ref: Any, rows: list[int], temperature: float) -> dict[str, Any]:
        """Old-policy logprobs, reference logprobs and values (B_rank, T) for ``rows`` of the batch (those >= 0;
        -1 rows are padding, computed and dropped), no gradients."""
        import ray
        import torch

        from rayalign.learner.batch import select_rows

        batch = ray.get(batch_ref)
        out: dict[str, list] = {"logprobs": [], "ref_logprobs": [], "values": []}
        micro = self.learner.micro_batch_size
        self.engine.eval()
        with torch.no_grad():
            for start in range(0, len(rows), micro):
                mb = select_rows(batch, rows[start:start + micro])
                logprobs, values, _ = self._forward(mb, temperature)
                ref, _, _ = self._forward(mb, temperature, reference=True)
                out["logprobs"].append(logprobs.float().cpu())
                out["ref_logprobs"].append(ref.float().cpu())
                if values is not None:
                    out["values"].append(values.cpu())
        self.engine.train()
        real = torch.tensor([r >= 0 for r in rows], dtype=torch.bool)
        return {k: torch.cat(v)[real] if v else None for k, v in out.items()}

    def train(self, batch_ref: Any, plan: list, temperature: float, kl_coef: float,
              single_pass: bool = False) -> dict[str, Any]:
        """PPO-style updates over the driver's plan (``plan[minibatch][rank][micro]`` = row indices).

        Each micro-batch's loss is its token mean scaled by its share of the minibatch's tokens (times the
        accumulation steps and the world size, which DeepSpeed divides out), so one optimizer step minimises
        the token mean over the whole minibatch, padding rows included as zeros.

        ``single_pass``: the plan is one optimizer step on freshly sampled rows and the batch carries no
        ``logprobs`` / ``ref_logprobs`` (the driver skipped `forward`). The old policy is then the current one:
        its logprobs are this pass's own, detached (ratio 1, the gradient unchanged), and the reference
        logprobs are computed here, micro-batch by micro-batch. The reply adds ``rows``, ``logprobs`` and
        ``ref_logprobs`` (this rank's rows, as `forward` would have returned them) for the driver's KL figures.
        """
        import ray
        import torch

        from rayalign.algorithms.core import masked_mean
        from rayalign.algorithms.kl import kl_estimate
        from rayalign.algorithms.ppo import entropy_from_logits, policy_loss, value_loss
        from rayalign.learner.batch import select_rows

        batch = ray.get(batch_ref)
        algo = self.algo
        sums: dict[str, float] = {}
        tokens_seen = 0.0
        grad_norms = []
        accumulation = len(plan[0][0]) if plan else 1
        if single_pass and len(plan) != 1:
            raise ValueError(f"single_pass needs a plan of exactly one optimizer step, got {len(plan)}")
        seen: dict[str, list] = {"rows": [], "logprobs": [], "ref_logprobs": []}
        for minibatch in plan:
            all_rows = [r for part in minibatch for micro in part for r in micro if r >= 0]
            minibatch_tokens = float(batch["response_mask"][all_rows].sum()) if all_rows else 0.0
            for micro_rows in minibatch[self.rank]:
                mb = select_rows(batch, micro_rows)
                mask = mb["response_mask"].to(self.device)
                if single_pass:
                    with torch.no_grad():
                        ref_logprobs = self._forward(mb, temperature, reference=True)[0]
                logprobs, values, selected = self._forward(mb, temperature)
                if single_pass:
                    old_logprobs = logprobs.detach()
                    real = [i for i, r in enumerate(micro_rows) if r >= 0]
                    seen["rows"] += [micro_rows[i] for i in real]
                    seen["logprobs"].append(old_logprobs[real].float().cpu())
                    seen["ref_logprobs"].append(ref_logprobs[real].float().cpu())
                else:
                    old_logprobs = mb["logprobs"].to(self.device)
                    ref_logprobs = mb["ref_logprobs"].to(self.device)
                pg, pg_stats = policy_loss(logprobs, old_logprobs, mb["advantages"].to(self.device), mask,
                                           algo.clip_eps)
                loss = pg
                stats = {"policy_loss": pg, **pg_stats}
                if values is not None:
                    vf, vf_stats = value_loss(values, mb["values"].to(self.device), mb["returns"].to(self.device),
                                              mask, algo.value_clip_eps)
                    loss = loss + algo.vf_coef * vf
                    stats.update(value_loss=vf, **vf_stats)
                if algo.kl_in_loss and kl_coef > 0:
                    kl = masked_mean(kl_estimate(logprobs, ref_logprobs, algo.estimator, mask), mask)
                    loss = loss + kl_coef * kl
                    stats["kl_loss"] = kl
                entropy = masked_mean(entropy_from_logits(selected), mask)
                if algo.entropy_coef:
                    loss = loss - algo.entropy_coef * entropy
                stats["entropy"] = entropy
                micro_tokens = float(mask.sum())
                scale = micro_tokens / minibatch_tokens * accumulation * self.world if minibatch_tokens else 0.0
                self.engine.backward(loss * scale)
                self.engine.step()
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * micro_tokens
                tokens_seen += micro_tokens
            norm = self.engine.get_global_grad_norm()
            if norm is not None:
                grad_norms.append(float(norm))
        out = {k: v / tokens_seen for k, v in sums.items()} if tokens_seen else {}
        out["tokens"] = tokens_seen
        out["optimizer_steps"] = float(len(plan))
        if grad_norms:
            out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["lr"] = float(self.engine.get_lr()[0])
        if single_pass:
            out.update(rows=seen["rows"], logprobs=torch.cat(seen["logprobs"]) if seen["rows"] else None,
                       ref_logprobs=torch.cat(seen["ref_logprobs"]) if seen["rows"] else None)
        return out

    def weight_group_address(self) -> tuple[str, int, str] | None:
        """Rank 0: where a new broadcast weight group meets (a store served from here) and its backend."""
        from rayalign.rollout.broadcast import serve_store

        if self.rank != 0:
            return None
        self._weight_store = serve_store()
        return self._weight_store.host, self._weight_store.port, "nccl" if self.device.type == "cuda" else "gloo"

    def join_weight_group(self, host: str, port: int, world_size: int, backend: str) -> None:
        """Rank 0 joins the broadcast weight group as its sender (rank 0); a group joined before is dropped."""
        from rayalign.rollout.broadcast import open_group

        if self.rank == 0:
            self._weight_group = None
            self._weight_group = (open_group(host, port, 0, world_size, backend, store=self._weight_store), backend)

    def publish(self, store_name: str | None, namespace: str, version: int, transport: str,
                dtype: str) -> dict[str, Any]:
        """Send the current policy as version ``version`` to the engines: into their weight store (``transport``
        "lora", "merged" or "full"), or "broadcast" to the weight group, whose engines receive it meanwhile.
        Rank 0 sends; under ZeRO-3 every rank takes part in gathering the weights."""
        import ray
        import torch

        from rayalign.rollout import broadcast
        from rayalign.rollout.weight_sync import full_payload, lora_payload

        t0 = time.perf_counter()
        engine_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype)
        if transport == "lora":
            with self._gathered(self._adapter_params()):
                if self.rank != 0:
                    return {}
                with tempfile.TemporaryDirectory(prefix="rayalign-adapter-") as d:
                    self.policy.lm.save_pretrained(d)
                    published = lora_payload(version, d)
        elif self.rank != 0:
            for _ in self._export_weights():  # the other ranks' part of each layer's gather
                pass
            return {}
        elif transport == "broadcast":
            # a failed broadcast (an engine died midway) is the driver's to retry, not the end of this learner
            weights = self._export_weights()
            try:
                if getattr(self, "_weight_group", None) is None:
                    raise RuntimeError("rank 0 has joined no weight group (join_weight_group first)")
                sent = broadcast.send(*self._weight_group, weights, dtype=engine_dtype)
            except Exception as e:
                for _ in weights:  # the other ranks' gathers (ZeRO-3) go on to the end
                    pass
                return {"error": f"{type(e).__name__}: {e}"}
            return {"seconds": time.perf_counter() - t0, "bytes": sent}
        else:
            published = full_payload(version, self._export_weights(), dtype=engine_dtype)
        ray.get(ray.get_actor(store_name, namespace=namespace).publish.remote(published))
        return {"seconds": time.perf_counter() - t0, "bytes": published.nbytes}

    def _adapter_params(self) -> list:
        return [p for n, p in self.policy.lm.named_parameters() if ".lora_" in n]

    def _export_weights(self) -> Iterator[tuple[str, Any]]:
        """(HF name, tensor) of the policy as a plain HF model, one module at a time: under LoRA the base weights
        with the adapter folded in, W + scale * (B @ A); the training model itself is left as it is. Under ZeRO-3
        each module's weights are gathered for the moment its tensors are yielded (copies, as the gathered
        storage is freed afterwards), so every rank must run the generator to its end. A tensor shared by two
        modules (tied input and output embeddings) is exported once, under its first name, as HF saves it."""
        import torch

        lm = self.policy.lm
        base = lm.get_base_model() if self.learner.finetune == "lora" else lm
        lora_layers = {name for name, m in base.named_modules() if hasattr(m, "get_delta_weight")}
        exported: set[int] = set()
        for prefix, module in base.named_modules():
            if any(prefix.startswith(f"{layer}.") for layer in lora_layers):
                continue  # a LoRA layer's base_layer / lora_A / lora_B: exported with the layer
            if prefix in lora_layers:
                inner = module.get_base_layer()
                tensors = {k: v for k, v in inner._parameters.items() if v is not None}
                params = list(module.parameters())
            else:
                tensors = {k: v for k, v in module._parameters.items() if v is not None}
                tensors.update({k: v for k, v in module._buffers.items()
                                if v is not None and k not in module._non_persistent_buffers_set})
                params = list(module.parameters(recurse=False))
            if prefix in lora_layers and any(id(v) in exported for v in tensors.values()):
                raise ValueError(f"LoRA on {prefix}, whose weight is tied to a module exported before: not supported")
            tensors = {k: v for k, v in tensors.items() if id(v) not in exported}
            exported.update(id(v) for v in tensors.values())
            if not tensors:
                continue
            with torch.no_grad(), self._gathered(params):
                for key, tensor in tensors.items():
                    tensor = tensor.detach()
                    if prefix in lora_layers and key == "weight":
                        tensor = tensor + module.get_delta_weight("default").to(tensor.dtype)
                    elif self.zero3:
                        tensor = tensor.clone()
                    yield f"{prefix}.{key}" if prefix else key, tensor

    def checkpoint(self, step: int, driver_state: dict[str, Any]) -> dict[str, Any]:
        """Every rank saves its DeepSpeed state (rank 0 also the driver's) and reports it to Ray Train, which
        merges the ranks' files into one checkpoint directory in storage."""
        import ray.train
        import torch
        from ray.train import Checkpoint

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="rayalign-ckpt-") as d:
            rng = [torch.get_rng_state()]
            self.engine.save_checkpoint(d, tag=DS_TAG, client_state={"rng": rng},
                                        exclude_frozen_parameters=self.learner.finetune == "lora")
            if self.rank == 0:
                (Path(d) / DRIVER_STATE).write_text(json.dumps(driver_state))
            ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"checkpoint_{step:06d}")
        return {"seconds": time.perf_counter() - t0}

    def save(self, output_dir: str, tokenizer_path: str) -> dict[str, Any]:
        """Rank 0 saves the final policy in HF format: the adapter (LoRA) and the merged model, plus the value
        head (PPO). Under ZeRO-3 every rank takes part in gathering the weights."""
        import torch
        from transformers import AutoTokenizer

        out = Path(output_dir)
        paths = {}
        if self.learner.finetune == "lora":
            with self._gathered(self._adapter_params()):
                if self.rank == 0:
                    self.policy.lm.save_pretrained(out / "adapter")
                    paths["adapter"] = str(out / "adapter")
        # tensors with their own storage (safetensors refuses views into DeepSpeed's flat buffers); ZeRO-3's are copies
        merged = ((name, t if self.zero3 else t.clone()) for name, t in self._export_weights())
        if self.rank != 0:
            for _ in merged:
                pass
        else:
            base = self.policy.lm.get_base_model() if self.learner.finetune == "lora" else self.policy.lm
            base.save_pretrained(out / "merged", state_dict=dict(merged))
            paths["merged"] = str(out / "merged")
        if self.policy.value_head is not None:
            with self._gathered(list(self.policy.value_head.parameters())):
                if self.rank == 0:
                    # clone: under ZeRO the parameters are views into one flat buffer that torch.save would write
                    torch.save({k: v.detach().clone() for k, v in self.policy.value_head.state_dict().items()},
                               out / "value_head.pt")
                    paths["value_head"] = str(out / "value_head.pt")
        if self.rank == 0:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
            for kind in ("adapter", "merged"):
                if kind in paths:
                    tokenizer.save_pretrained(paths[kind])
        return paths


def train_loop(spec: dict[str, Any]) -> None:
    """Ray Train entry point: build the worker, then run the hub's commands until "stop"."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if spec["learner"].num_gpus_per_worker == 0 else "cuda")
    import ray
    import ray.train

    hub = ray.get_actor(spec["hub_name"], namespace=spec["namespace"])
    rank = ray.train.get_context().get_world_rank()
    try:
        worker = LearnerWorker(spec)
    except Exception:
        ray.get(hub.fail.remote(rank, traceback.format_exc()))
        raise
    while True:
        command_id, name, kwargs = ray.get(hub.next.remote(rank))
        if name == "stop":
            ray.get(hub.reply.remote(command_id, rank, None))
            return
        try:
            result = getattr(worker, name)(**kwargs)
        except Exception:
            ray.get(hub.fail.remote(rank, traceback.format_exc(), command_id))
            raise
        ray.get(hub.reply.remote(command_id, rank, result))
