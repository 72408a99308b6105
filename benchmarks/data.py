"""The generation pipeline's speed and memory: Ray Data + `ray.data.llm` vs a plain `vllm.LLM` loop, and the
driver's memory as the input grows.

1. Throughput. The same chat prompts (the shipped train set, cycled) and sampling (fixed lengths, ``ignore_eos``)
   through (a) rayalign's pipeline -- `rayalign.data.pipelines.vllm_stage` on Ray Data, one engine on the same
   cores, rows streamed back to the driver by `run_sharded` -- and (b) one process calling ``vllm.LLM.chat`` on
   batches of the same size. Each side runs cold twice, on ``--small`` and ``--large`` prompts, in its own
   subprocess, one at a time; the engine start cancels out of the difference, so the marginal rate
   ``(large - small) * tokens / (t_large - t_small)`` is what each side sustains once running. The cold
   end-to-end rate on ``--large`` (engine start included) is printed too.
2. Driver memory. The sharded path of jobs/generate_preferences.py (input planned and read by shards, rows
   streamed into `run_sharded`, Parquet shards and a manifest written, a rule scored in a Ray Data stage) with
   the LLM stage swapped for a cheap one, on 1k and 10k input rows; the driver's peak RSS of each.

Last stdout line: one JSON object with the figures and
  ratios.pipeline_vs_loop       marginal output tokens/s of the pipeline / of the plain loop (target >= 0.9)
  ratios.driver_rss_10x_rows    driver peak RSS with 10k rows / with 1k rows (target <= 1.2)

    python benchmarks/data.py [--small 64] [--large 384] [--tokens 64] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


RESULT = "RESULT "
"""Prefix of a child's result line."""


def prompts(n: int) -> list[str]:
    from rayalign.data.prompts import load_prompts

    pool = load_prompts("builtin:vegetarian/train").prompts
    return [pool[i % len(pool)] for i in range(n)]


def run_pipeline(n: int, tokens: int, batch: int) -> dict:
    import ray

    from rayalign.config import EngineConfig, ModelConfig, SamplingConfig
    from rayalign.data.pipelines import Generation, generated, run_sharded, sampling_params, vllm_stage
    from rayalign.models import resolve_model

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    gen = Generation(resolve_model("smollm2-135m-instruct", progress=False), ModelConfig(), EngineConfig(), batch)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=tokens)
    shard_size = batch
    texts = prompts(n)

    def rows(item: dict) -> list[dict]:
        s = item["shard"]
        return [{"shard": s, "user_prompt": p} for p in texts[s * shard_size:(s + 1) * shard_size]]

    def pre(row: dict) -> dict:
        return {**row, "messages": [{"role": "user", "content": row["user_prompt"]}],
                "sampling_params": sampling_params(sampling, None, ignore_eos=True)}

    def post(row: dict) -> dict:
        _, produced, error = generated(row)
        return {"shard": row["shard"], "tokens": produced, "error": error}

    shards = list(range((n + shard_size - 1) // shard_size))
    produced = []
    t0 = time.perf_counter()
    ds = vllm_stage(gen, pre, post)(ray.data.from_items([{"shard": s} for s in shards],
                                                        override_num_blocks=len(shards)).flat_map(rows))
    run_sharded(ds, {s: len(rows({"shard": s})) for s in shards},
                lambda s, out: produced.extend(r["tokens"] for r in out if not r["error"]))
    seconds = time.perf_counter() - t0
    ray.shutdown()
    return {"seconds": seconds, "tokens": sum(produced), "rows": len(produced)}


def run_loop(n: int, tokens: int, batch: int) -> dict:
    from rayalign.config import EngineConfig
    from rayalign.data.pipelines import engine_env
    from rayalign.models import resolve_model

    os.environ.update(engine_env(EngineConfig()))  # the pipeline engine's cores and KV cache
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(model=resolve_model("smollm2-135m-instruct", progress=False), dtype="bfloat16", max_model_len=1024,
              enforce_eager=True)
    params = SamplingParams(temperature=1.0, max_tokens=tokens, ignore_eos=True)
    texts = prompts(n)
    produced = 0
    for i in range(0, n, batch):
        outs = llm.chat([[{"role": "user", "content": p}] for p in texts[i:i + batch]], params, use_tqdm=False)
        produced += sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": time.perf_counter() - t0, "tokens": produced, "rows": n}


def run_memory(rows: int) -> dict:
    """The sharded path with a cheap stage instead of the LLM; the driver's peak RSS."""
    import ray

    from rayalign.config import RewardComponent, RewardConfig
    from rayalign.data.pairing import build_preferences
    from rayalign.data.pipelines import reward_stage, run_sharded
    from rayalign.data.prompts import plan_input_shards, read_input_shard
    from rayalign.data.shards import ShardedOutput
    import pyarrow as pa

    work = Path(tempfile.mkdtemp(prefix="rayalign-bench-data-"))
    path = work / "prompts.jsonl"
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"prompt": f"Question {i}: what can I cook tonight with lentils, rice and "
                                          f"{'spinach' if i % 2 else 'chicken'}?"}) + "\n")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    src, shards = plan_input_shards(str(path), 64)
    schema = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())])
    out = ShardedOutput(work / "out", {"rows": rows}, {"pairs": schema})
    by_index = {s.index: s for s in shards}

    def answers(item: dict) -> list[dict]:
        return [{"shard": item["shard"], "prompt_id": pid, "prompt": p, "key": f"{pid}:{k}", "round": 0,
                 "source": "policy"} for pid, p in read_input_shard(src, by_index[item["shard"]]) for k in range(2)]

    def cheap_llm(batch: dict) -> dict:  # in place of the vLLM stage: an answer that names the prompt's last food
        batch = dict(batch)
        batch["response"] = [f"Try it with {p.split()[-1].rstrip('?')}." if k.endswith(":0") else "Try tofu."
                             for p, k in zip(batch["prompt"], batch["key"])]
        return batch

    reward = RewardConfig(components=(RewardComponent(name="lexicon", kind="rule", rule="vegetarian_lexicon"),))

    def finish(shard: int, got: list[dict]) -> None:
        pairs, _, _ = build_preferences([{**r, "error": r["reward_error"]} for r in got], 0.5, 0.2)
        out.write(shard, {"pairs": [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]},
                  {"pairs": len(pairs)})

    t0 = time.perf_counter()
    ds = ray.data.from_items([{"shard": s.index} for s in shards], override_num_blocks=len(shards))
    ds = reward_stage(reward)(ds.flat_map(answers).map_batches(cheap_llm, batch_size=64))
    run_sharded(ds, {s.index: 2 * s.prompts for s in shards}, finish)
    seconds = time.perf_counter() - t0
    pairs = sum(s["pairs"] for s in out.shards.values())
    ray.shutdown()
    return {"seconds": seconds, "pairs": pairs, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(kind: str, *args: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, *map(str, args)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", RAY_DEDUP_LOGS="1")
    log = Path(tempfile.gettempdir()) / f"rayalign-bench-data-{kind}-{args[0]}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{kind} {args} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]  # vLLM prints to stdout too
    result = json.loads(lines[-1][len(RESULT):])
    print(f"{kind} {args[0]}: {json.dumps(result)} ({time.perf_counter() - t0:.0f} s with start-up; log {log})",
          flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=64)
    parser.add_argument("--large", type=int, default=384)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rows", type=int, nargs=2, default=(1000, 10000))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *numbers = args.child
        fn = {"pipeline": run_pipeline, "loop": run_loop, "memory": run_memory}[kind]
        print(RESULT + json.dumps(fn(*map(int, numbers))), flush=True)
        return

    runs = {}
    for kind in ("loop", "pipeline"):
        for n in (args.small, args.large):
            runs[(kind, n)] = child(kind, n, args.tokens, args.batch)

    def marginal(kind: str) -> float:
        small, large = runs[(kind, args.small)], runs[(kind, args.large)]
        if large["seconds"] <= small["seconds"]:  # the machine's load changed between the two runs
            print(f"warning: {kind}: the {args.large}-prompt run was not slower than the {args.small}-prompt run; "
                  f"its marginal rate means nothing (measure again on a quiet machine)", flush=True)
            return float("nan")
        return (large["tokens"] - small["tokens"]) / (large["seconds"] - small["seconds"])

    memory = {n: child("memory", n) for n in args.rows}
    figures = {
        "tokens_per_response": args.tokens, "batch": args.batch, "prompts": [args.small, args.large],
        "pipeline_tokens_per_s": round(marginal("pipeline"), 1), "loop_tokens_per_s": round(marginal("loop"), 1),
        "pipeline_prompts_per_s": round(marginal("pipeline") / args.tokens, 2),
        "loop_prompts_per_s": round(marginal("loop") / args.tokens, 2),
        "cold_seconds": {f"{k}_{n}": round(v["seconds"], 1) for (k, n), v in runs.items()},
        "driver_peak_rss_mib": {str(n): round(m["peak_rss_mib"], 1) for n, m in memory.items()},
        "memory_run_seconds": {str(n): round(m["seconds"], 1) for n, m in memory.items()},
        "memory_run_pairs": {str(n): m["pairs"] for n, m in memory.items()},
    }
    small_rows, large_rows = args.rows
    figures["ratios"] = {
        "pipeline_vs_loop": round(marginal("pipeline") / marginal("loop"), 3),
        "pipeline_vs_loop_cold": round(runs[("pipeline", args.large)]["tokens"] / runs[("pipeline", args.large)]["seconds"]
                                       / (runs[("loop", args.large)]["tokens"] / runs[("loop", args.large)]["seconds"]), 3),
        "driver_rss_10x_rows": round(memory[large_rows]["peak_rss_mib"] / memory[small_rows]["peak_rss_mib"], 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
