"""Weight sync: seconds per sync for each transport, against a raw in-memory copy of the same bytes.

- LoRA: the default adapter (rank 16 on every linear layer, `rayalign.config.LoraConfig`) published to the store
  and applied by the engine (new `LoRARequest`, old one removed); median of ``--repeats``.
- Full: every weight of the model in the engine's dtype, written to shared-memory buckets (publish) and reloaded
  in place by the engine (sync); median of ``--repeats``. Baseline: `Tensor.copy_` of the same tensors into
  preallocated buffers in this process (one memcpy of the same bytes).
- Broadcast: the same weights pushed to the same engine by a collective broadcast from this process (gloo on
  CPU; `learner.full_sync=broadcast`), send and in-place reload together; median of ``--repeats`` after one push
  that forms the group.
Last stdout line: one JSON object with the figures and
  seconds.lora_sync              publish + sync of the default adapter (target < 1)
  ratios.full_sync_vs_raw_copy   engine-side full sync / raw copy (target <= 2)
  ratios.broadcast_vs_raw_copy   broadcast push / raw copy (no target: the transport for clusters)

    python benchmarks/weight_sync.py [--repeats 3] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    import ray
    import torch
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rayalign.config import EngineConfig, LoraConfig, ModelConfig, SamplingConfig
    from rayalign.models import resolve_model
    from rayalign.weights.broadcast import ProcessSender
    from rayalign.rollout.group import RolloutGroup
    from rayalign.weights import SyncPlan
    from rayalign.weights.store import adapter_payload, full_payload

    model_path = resolve_model(args.model)
    dtype = getattr(torch, args.dtype)
    probe = SamplingConfig(temperature=0.0, max_new_tokens=4)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    figures: dict = {"model": args.model, "dtype": args.dtype, "repeats": args.repeats}

    # LoRA ------------------------------------------------------------------------------------------------------
    lora = LoraConfig()
    group = RolloutGroup(model_path, ModelConfig(dtype=args.dtype), EngineConfig(), sync_plan=SyncPlan("adapter"),
                         max_lora_rank=lora.rank)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
                           PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                                          init_lora_weights=False))
    tmp = Path(tempfile.mkdtemp(prefix="rayalign-bench-"))
    save_s, sync_s, adapter_bytes = [], [], 0
    for _ in range(args.repeats):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(1.01)
        version = group.next_version()
        t0 = time.perf_counter()
        model.save_pretrained(tmp / f"v{version}")
        t1 = time.perf_counter()
        published = adapter_payload(version, tmp / f"v{version}")
        group.publish(published)
        report = group.sync()
        t2 = time.perf_counter()
        assert report.version == version
        assert all(r.policy_version == version for r in group.generate(["Hi"], probe))
        save_s.append(t1 - t0)
        sync_s.append(t2 - t1)
        adapter_bytes = published.nbytes
    group.shutdown()
    figures["lora"] = {"adapter_mb": round(adapter_bytes / 1e6, 2), "rank": lora.rank,
                       "save_seconds": round(statistics.median(save_s), 4),
                       "publish_and_sync_seconds": [round(s, 4) for s in sync_s]}
    print(f"lora: adapter {adapter_bytes / 1e6:.1f} MB, publish+sync {statistics.median(sync_s):.3f} s", flush=True)
    del model

    # Full weights ----------------------------------------------------------------------------------------------
    group = RolloutGroup(model_path, ModelConfig(dtype=args.dtype), EngineConfig(), sync_plan=SyncPlan("full"))
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    params = [(n, p.detach()) for n, p in model.named_parameters()]
    nbytes = sum(p.numel() * p.element_size() for _, p in params)
    raw_s, publish_s, full_sync_s = [], [], []
    for _ in range(args.repeats):
        with torch.no_grad():
            for _, p in params:
                p.mul_(1.0001)
        buffers = [torch.empty_like(p) for _, p in params]
        t0 = time.perf_counter()
        for buf, (_, p) in zip(buffers, params):
            buf.copy_(p)
        raw_s.append(time.perf_counter() - t0)
        del buffers
        version = group.next_version()
        t0 = time.perf_counter()
        published = full_payload(version, params)
        group.publish(published)
        t1 = time.perf_counter()
        report = group.sync()
        t2 = time.perf_counter()
        assert report.version == version
        assert all(r.policy_version == version for r in group.generate(["Hi"], probe))
        publish_s.append(t1 - t0)
        full_sync_s.append(t2 - t1)

    # Broadcast: the same engine, weights pushed from this process
    sender = ProcessSender(lambda: params)
    t0 = time.perf_counter()
    group.push(group.next_version(), sender)
    form_s = time.perf_counter() - t0
    push_s = []
    for _ in range(args.repeats):
        with torch.no_grad():
            for _, p in params:
                p.mul_(1.0001)
        version = group.next_version()
        report = group.push(version, sender)
        assert report.sent_bytes == nbytes
        assert all(r.policy_version == version for r in group.generate(["Hi"], probe))
        push_s.append(report.seconds)
    group.shutdown()
    ray.shutdown()
    push = statistics.median(push_s)
    figures["broadcast"] = {"backend": "gloo", "first_push_seconds": round(form_s, 4),
                            "push_seconds": round(push, 4), "gb_per_s": round(nbytes / push / 1e9, 3)}
    print(f"broadcast: first push (forms the group) {form_s:.3f} s, then {push:.3f} s", flush=True)
    raw, pub, sync = (statistics.median(x) for x in (raw_s, publish_s, full_sync_s))
    figures["full"] = {"mb": round(nbytes / 1e6, 1), "buckets": len(published.buckets),
                       "raw_copy_seconds": round(raw, 4), "publish_seconds": round(pub, 4),
                       "sync_seconds": round(sync, 4), "sync_gb_per_s": round(nbytes / sync / 1e9, 3),
                       "raw_copy_gb_per_s": round(nbytes / raw / 1e9, 3)}
    print(f"full: {nbytes / 1e6:.0f} MB, raw copy {raw:.3f} s, publish {pub:.3f} s, sync {sync:.3f} s", flush=True)
    figures["seconds"] = {"lora_sync": round(statistics.median(sync_s), 4), "full_sync": round(sync, 4),
                          "full_publish": round(pub, 4), "raw_copy": round(raw, 4), "broadcast": round(push, 4)}
    figures["ratios"] = {"full_sync_vs_raw_copy": round(sync / raw, 3),
                         "full_publish_and_sync_vs_raw_copy": round((pub + sync) / raw, 3),
                         "broadcast_vs_raw_copy": round(push / raw, 3)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
