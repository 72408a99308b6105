"""Rollout throughput: rayalign's engines vs a plain `vllm.LLM` vs HF `generate`, at batch 1, 8 and 32.

Same model (the embedded SmolLM2 unless --model), same chat prompts, fixed response lengths (``ignore_eos``), one
thing running at a time; plain vLLM gets the same cores and KV cache as rayalign's engine, HF generate all cores. Output tokens per second, best of ``--repeats`` timed runs after a warm-up.
Last stdout line: one JSON object with the figures and
  ratios.rayalign_vs_vllm        rayalign / plain vLLM at batch 32 (target >= 0.9)
  ratios.rayalign_vs_hf_batch32  rayalign / HF generate at batch 32 (target >= 5)

    python benchmarks/rollout.py [--tokens 64] [--repeats 2] [--dtype bfloat16] [--hf-dtype bfloat16]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCHES = (1, 8, 32)


def prompts_for(n: int) -> list[str]:
    from rayalign.data.prompts import load_prompts

    pool = load_prompts("builtin:vegetarian/holdout").prompts
    return [pool[i % len(pool)] for i in range(n)]


def best_rate(fn, batch: int, tokens: int, repeats: int) -> float:
    fn(prompts_for(min(batch, 2)))  # warm-up
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        produced = fn(prompts_for(batch))
        elapsed = time.perf_counter() - t0
        assert produced == batch * tokens, f"expected {batch * tokens} tokens, got {produced}"
        best = max(best, produced / elapsed)
    return best


def bench_rayalign(model_path: str, args) -> dict[int, float]:
    import ray

    from rayalign.config import EngineConfig, ModelConfig, SamplingConfig
    from rayalign.rollout.group import RolloutGroup

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    group = RolloutGroup(model_path, ModelConfig(dtype=args.dtype), EngineConfig(num_engines=1))
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.tokens, ignore_eos=True, seed=0)
    try:
        return {b: best_rate(lambda p: sum(len(r.response_token_ids) for r in group.generate(p, sampling)),
                             b, args.tokens, args.repeats) for b in BATCHES}
    finally:
        group.shutdown()
        ray.shutdown()


def bench_vllm(model_path: str, args) -> dict[int, float]:
    from rayalign.resources import cpu_cores_for_engine

    # The same KV cache and cores as rayalign's single engine, so the ratio measures rayalign's own overhead.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_cores_for_engine(0, 1)
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, dtype=args.dtype, max_model_len=1024, enforce_eager=True)
    params = SamplingParams(temperature=1.0, max_tokens=args.tokens, ignore_eos=True, seed=0, logprobs=0)

    def run(prompts):
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    try:
        return {b: best_rate(run, b, args.tokens, args.repeats) for b in BATCHES}
    finally:
        del llm
        gc.collect()


def bench_hf(model_path: str, args) -> dict[int, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.hf_dtype)).eval()

    def run(prompts):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                 for p in prompts]
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=True,
                                 pad_token_id=tok.pad_token_id)
        return (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]

    return {b: best_rate(run, b, args.tokens, args.repeats) for b in BATCHES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", help="dtype of both vLLM paths")
    parser.add_argument("--hf-dtype", default="bfloat16", help="dtype of HF generate (on this AMX CPU bf16 is its faster path: 163 vs 102 tok/s at batch 32)")
    args = parser.parse_args()

    from rayalign.models import resolve_model

    model_path = resolve_model(args.model)
    results = {}
    for name, fn in (("rayalign", bench_rayalign), ("vllm", bench_vllm), ("hf", bench_hf)):
        t0 = time.perf_counter()
        results[name] = fn(model_path, args)
        print(f"{name}: " + ", ".join(f"batch {b}: {r:.1f} tok/s" for b, r in results[name].items())
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    figures = {
        "model": args.model, "tokens_per_response": args.tokens, "dtype": args.dtype, "hf_dtype": args.hf_dtype,
        "output_tokens_per_second": {name: {str(b): round(r, 2) for b, r in res.items()} for name, res in results.items()},
        "ratios": {
            "rayalign_vs_vllm": round(results["rayalign"][32] / results["vllm"][32], 3),
            "rayalign_vs_vllm_batch1": round(results["rayalign"][1] / results["vllm"][1], 3),
            "rayalign_vs_vllm_batch8": round(results["rayalign"][8] / results["vllm"][8], 3),
            "rayalign_vs_hf_batch32": round(results["rayalign"][32] / results["hf"][32], 3),
            "rayalign_vs_hf_batch1": round(results["rayalign"][1] / results["hf"][1], 3),
        },
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
