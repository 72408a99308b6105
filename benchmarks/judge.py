"""Judge throughput: judgements/s at 1, 8 and 32 concurrent requests, three ways, one after the other:
  serve_batched    one request per pair to the Serve deployment, gathered by @serve.batch
  serve_unbatched  the same requests to the same replica's unbatched method
  serve_one_request  the whole list in one request (`judge_many`, what the training driver sends)
  direct           JudgeCore (the same vLLM engine code) called in this process with the whole batch
Same judge (the default: SmolLM2, score mode, vegetarian rubric), same pairs from the shipped validation set.
Last stdout line: one JSON object with the figures and
  ratios.batched_vs_unbatched_32   (target >= 5)
  ratios.serve_vs_direct           serve_batched / direct at 32 (target >= 0.9)

    python benchmarks/judge.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONCURRENCY = (1, 8, 32)


def pairs(n: int) -> list[tuple[str, str]]:
    from rayalign.data.prompts import dataset_path

    rows = [json.loads(line) for line in dataset_path("builtin:vegetarian/judge_validation").open()]
    return [(rows[i % len(rows)]["prompt"], rows[i % len(rows)]["response"]) for i in range(n)]


def best(fn, n: int, repeats: int) -> float:
    fn(pairs(2))  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(pairs(n))
        elapsed = time.perf_counter() - t0
        assert len(out) == n and all(j.score is not None for j in out)
        rates.append(n / elapsed)
    return max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import ray

    from rayalign.config import JudgeConfig
    from rayalign.judge.vllm_judge import JudgeCore, ServeJudge
    from rayalign.models import resolve_model
    from rayalign.resources import cpu_cores_for_engine

    config = JudgeConfig()  # the default judge: score mode, batches of up to 32, 0.1 s batch wait
    model_path = resolve_model(config.model)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    judge = ServeJudge(model_path, config)
    handle = judge.handle

    def serve(method):
        def run(batch):
            responses = [getattr(handle, method).remote(pair) for pair in batch]
            return [r.result(timeout_s=600) for r in responses]
        return run

    figures: dict = {"judgements_per_second": {"serve_batched": {}, "serve_unbatched": {}, "serve_one_request": {},
                                               "direct": {}}}
    for c in CONCURRENCY:
        figures["judgements_per_second"]["serve_batched"][str(c)] = round(best(serve("judge"), c, args.repeats), 3)
        figures["judgements_per_second"]["serve_unbatched"][str(c)] = round(
            best(serve("judge_unbatched"), c, args.repeats), 3)
        figures["judgements_per_second"]["serve_one_request"][str(c)] = round(
            best(lambda batch: handle.judge_many.remote(batch).result(timeout_s=600), c, args.repeats), 3)
        print(f"concurrency {c}: {figures['judgements_per_second']['serve_batched'][str(c)]} batched, "
              f"{figures['judgements_per_second']['serve_unbatched'][str(c)]} unbatched judgements/s", flush=True)
    judge.shutdown()
    ray.shutdown()

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(config.engine.cpu_kvcache_gib)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_cores_for_engine(0, 1)  # the cores the Serve replica had
    core = JudgeCore(model_path, config)
    for c in CONCURRENCY:
        figures["judgements_per_second"]["direct"][str(c)] = round(best(core.judge, c, args.repeats), 3)
    print(f"direct: {figures['judgements_per_second']['direct']}", flush=True)
    rates = figures["judgements_per_second"]
    figures["ratios"] = {
        "batched_vs_unbatched_32": round(rates["serve_batched"]["32"] / rates["serve_unbatched"]["32"], 3),
        "serve_vs_direct": round(rates["serve_batched"]["32"] / rates["direct"]["32"], 3),
        "serve_one_request_vs_direct": round(rates["serve_one_request"]["32"] / rates["direct"]["32"], 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
