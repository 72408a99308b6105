"""Judge throughput: judgements/s at 1, 8 and 32 concurrent requests, five ways:
  serve_batched      one request per pair to the Serve deployment, gathered by @serve.batch
  serve_unbatched    the same requests to the same replica's unbatched method
  serve_one_request  the whole list in one request (`judge_many`, what the training driver sends)
  direct             JudgeCore (the same vLLM engine code) called in this process with the whole batch
  ray_serve_llm      the same model as a ray.serve.llm app (judge.backend=ray_serve_llm): one HTTP request per
                     pair through Serve's proxy, batched by vLLM's own scheduler
Same judge (the default: SmolLM2, score mode, vegetarian rubric), same pairs from the shipped validation set, the
same cores (the Serve replica's engine and the direct one are bound to the same cores and take turns), the same
process priority (Ray's workers run at nice 15 by default; here at 0, like this process).
The ways are measured interleaved (each repeat runs all four back to back, in a rotating order), so a slow spell
on this shared machine hits them alike; figures are medians over repeats, and the ratios are medians of the
per-repeat ratios (numerator and denominator measured seconds apart).
Last stdout line: one JSON object with the figures and
  ratios.batched_vs_unbatched_32   (target >= 5)
  ratios.serve_vs_direct           serve_batched / direct at 32 (target >= 0.9)
  ratios.ray_serve_llm_vs_serve_one_request   the two in-job judge backends, as a PPO step calls them (none)

    python benchmarks/judge.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONCURRENCY = (1, 8, 32)


def pairs(n: int) -> list[tuple[str, str]]:
    from rayalign.data.prompts import dataset_path

    rows = [json.loads(line) for line in dataset_path("builtin:vegetarian/judge_validation").open()]
    return [(rows[i % len(rows)]["prompt"], rows[i % len(rows)]["response"]) for i in range(n)]


UNSCORED: dict[str, int] = {}
"""Judgements without a score, by way (an answer the parser could not read: counted, never a 0)."""


def rate(fn, n: int, way: str = "") -> float:
    batch = pairs(n)
    t0 = time.perf_counter()
    out = fn(batch)
    elapsed = time.perf_counter() - t0
    assert len(out) == n
    UNSCORED[way] = UNSCORED.get(way, 0) + sum(j.score is None for j in out)
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import ray

    from rayalign.config import JudgeConfig
    from rayalign.judge.serve_llm_judge import ServeLLMJudge
    from rayalign.judge.vllm_judge import JudgeCore, ServeJudge
    from rayalign.models import resolve_model
    from rayalign.resources import cpu_cores_for_engine

    config = JudgeConfig()  # the default judge: score mode, batches of up to 32, 0.1 s batch wait
    model_path = resolve_model(config.model)
    # Ray starts its workers (the Serve replica) at nice 15, and the direct engine runs in this process at nice 0:
    # on a busy machine that alone tilts the comparison, so both run at the same priority here
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    judge = ServeJudge(model_path, config)
    handle = judge.handle
    llm_judge = ServeLLMJudge(model_path, dataclasses.replace(config, backend="ray_serve_llm"))
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(config.engine.cpu_kvcache_gib)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_cores_for_engine(0, 1)  # the cores the Serve replica has
    core = JudgeCore(model_path, config)

    def serve(method):
        def run(batch):
            responses = [getattr(handle, method).remote(pair) for pair in batch]
            return [r.result(timeout_s=600) for r in responses]
        return run

    ways = {"serve_batched": serve("judge"), "serve_unbatched": serve("judge_unbatched"),
            "serve_one_request": lambda batch: handle.judge_many.remote(batch).result(timeout_s=600),
            "direct": core.judge,
            "ray_serve_llm": lambda batch: llm_judge.judge([p for p, _ in batch], [r for _, r in batch])}
    for fn in ways.values():  # warm-up at every concurrency (the first batch of a new shape is slow on CPU)
        for c in CONCURRENCY:
            fn(pairs(c))
    samples: dict[str, dict[int, list[float]]] = {w: {c: [] for c in CONCURRENCY} for w in ways}
    names = list(ways)
    for repeat in range(args.repeats):
        for c in CONCURRENCY:
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:  # rotate the order
                samples[name][c].append(rate(ways[name], c, name))
        print(f"repeat {repeat + 1}/{args.repeats}: at 32, " + ", ".join(
            f"{w} {samples[w][32][-1]:.1f}" for w in names) + " judgements/s", flush=True)
    judge.shutdown()
    llm_judge.shutdown()
    ray.shutdown()

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(samples[a][32], samples[b][32]))

    figures: dict = {
        "repeats": args.repeats,
        "judgements_per_second": {w: {str(c): round(statistics.median(samples[w][c]), 3) for c in CONCURRENCY}
                                  for w in names},
        "judgements_per_second_all_repeats_32": {w: [round(x, 2) for x in samples[w][32]] for w in names},
        "unscored_judgements": {w: UNSCORED.get(w, 0) for w in names},
        "ratios": {"batched_vs_unbatched_32": round(paired("serve_batched", "serve_unbatched"), 3),
                   "serve_vs_direct": round(paired("serve_batched", "direct"), 3),
                   "serve_one_request_vs_direct": round(paired("serve_one_request", "direct"), 3),
                   "ray_serve_llm_vs_serve_one_request": round(paired("ray_serve_llm", "serve_one_request"), 3)},
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
