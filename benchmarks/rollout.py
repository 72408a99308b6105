"""Rollout throughput: rayalign's engines vs a plain `vllm.LLM` vs HF `generate`, at batch 1, 8 and 32.

Same model (the embedded SmolLM2 unless --model), same chat prompts, fixed response lengths (``ignore_eos``), one
thing running at a time; plain vLLM gets the same cores and KV cache as rayalign's engine, HF generate all cores.
Output tokens per second. rayalign's engine and the plain `vllm.LLM` are both started first and stay up (an idle
vLLM engine blocks on its queue); then --repeats rounds, each timing every batch size on rayalign and then on plain
vLLM, so a slow spell of this shared machine hits both sides of a round. A round's ratio is rayalign / vLLM; the
figure is the median over rounds, printed with its spread. HF generate runs once, after.
Last stdout line: one JSON object with the figures and
  ratios.rayalign_vs_vllm         median over rounds of rayalign / plain vLLM at batch 32 (target >= 0.9)
  ratios.rayalign_vs_vllm_batch8  the same at batch 8 (target >= 0.9); _batch1 at batch 1
  ratios.rayalign_vs_hf_batch32   rayalign (median) / HF generate at batch 32

    python benchmarks/rollout.py [--tokens 64] [--repeats 3] [--dtype best] [--hf-dtype float32] [--no-hf]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCHES = (1, 8, 32)


def prompts_for(n: int) -> list[str]:
    from rayalign.data.prompts import load_prompts

    pool = load_prompts("builtin:vegetarian/holdout").prompts
    return [pool[i % len(pool)] for i in range(n)]


def rate(fn, batch: int, tokens: int) -> float:
    t0 = time.perf_counter()
    produced = fn(prompts_for(batch))
    elapsed = time.perf_counter() - t0
    if produced != batch * tokens:
        raise SystemExit(f"expected {batch * tokens} tokens, got {produced}")
    return produced / elapsed


def start_rayalign(model_path: str, args):
    """rayalign's single engine (a Ray actor on the local Ray): (generate function, shutdown)."""
    import ray

    from rayalign.config import EngineConfig, ModelConfig, SamplingConfig
    from rayalign.rollout.group import RolloutGroup

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    group = RolloutGroup(model_path, ModelConfig(dtype=args.dtype), EngineConfig(num_engines=1))
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.tokens, ignore_eos=True, seed=0)

    def run(prompts):
        return sum(len(r.response_token_ids) for r in group.generate(prompts, sampling))

    def stop():
        group.shutdown()
        ray.shutdown()

    return run, stop


def start_vllm(model_path: str, args):
    """A plain `vllm.LLM` in this process, with rayalign's engine's KV cache and cores: (generate, shutdown)."""
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

    def stop():
        nonlocal llm
        del llm
        gc.collect()

    return run, stop


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

    run(prompts_for(2))  # warm-up
    return {b: max(rate(run, b, args.tokens) for _ in range(2)) for b in BATCHES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median ratio")
    parser.add_argument("--dtype", default="best",
                        help="dtype of both vLLM paths (best: what the jobs' engines use here, rayalign.resources)")
    parser.add_argument("--hf-dtype", default=None, help="dtype of HF generate (default: the vLLM paths')")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF generate baseline")
    args = parser.parse_args()
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")

    from rayalign.models import resolve_model
    from rayalign.resources import engine_dtype

    args.dtype = engine_dtype(args.dtype, 0)
    args.hf_dtype = args.hf_dtype or args.dtype
    model_path = resolve_model(args.model)
    t0 = time.perf_counter()
    ours, stop_ours = start_rayalign(model_path, args)
    theirs, stop_theirs = start_vllm(model_path, args)
    print(f"both engines up in {time.perf_counter() - t0:.0f} s", flush=True)
    rounds: list[dict[str, dict[int, float]]] = []
    try:
        for fn in (ours, theirs):
            fn(prompts_for(2))  # warm-up
        for r in range(args.repeats):
            rounds.append({name: {b: rate(fn, b, args.tokens) for b in BATCHES}
                           for name, fn in (("rayalign", ours), ("vllm", theirs))})
            print(f"round {r}: " + "; ".join(f"{name} " + ", ".join(f"b{b} {x:.1f}" for b, x in res.items())
                                             for name, res in rounds[-1].items()) + " tok/s", flush=True)
    finally:
        stop_theirs()
        stop_ours()
    per_round = {b: [rd["rayalign"][b] / rd["vllm"][b] for rd in rounds] for b in BATCHES}
    median = {name: {b: statistics.median(rd[name][b] for rd in rounds) for b in BATCHES}
              for name in ("rayalign", "vllm")}
    hf = None if args.no_hf else bench_hf(model_path, args)
    for b in BATCHES:
        print(f"batch {b}: rayalign / vLLM median {statistics.median(per_round[b]):.3f} over {len(rounds)} rounds "
              f"(each: {', '.join(f'{x:.3f}' for x in per_round[b])})" + (f"; HF {hf[b]:.1f} tok/s" if hf else ""),
              flush=True)
    ratios = {"rayalign_vs_vllm": statistics.median(per_round[32]),
              "rayalign_vs_vllm_batch8": statistics.median(per_round[8]),
              "rayalign_vs_vllm_batch1": statistics.median(per_round[1])}
    if hf:
        ratios.update(rayalign_vs_hf_batch32=median["rayalign"][32] / hf[32],
                      rayalign_vs_hf_batch1=median["rayalign"][1] / hf[1])
    r2 = lambda x: round(x, 2)  # noqa: E731
    print(json.dumps({
        "benchmark": "rollout", "model": args.model, "tokens_per_response": args.tokens, "dtype": args.dtype,
        "hf_dtype": None if args.no_hf else args.hf_dtype, "rounds": len(rounds), "cpu_count": os.cpu_count(),
        "output_tokens_per_second": {
            "per_round": [{name: {str(b): r2(x) for b, x in res.items()} for name, res in rd.items()} for rd in rounds],
            "median": {name: {str(b): r2(x) for b, x in res.items()} for name, res in median.items()},
            **({"hf": {str(b): r2(x) for b, x in hf.items()}} if hf else {})},
        "rayalign_vs_vllm_spread": {str(b): [round(min(v), 3), round(max(v), 3)] for b, v in per_round.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
    }))


if __name__ == "__main__":
    main()
