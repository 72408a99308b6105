"""A capacity plan for a PPO profile: tokens per RL step, how many rollout engines and judge replicas keep pace with
the learner, and GPU-hours per 1,000 steps. How a user sizes a KubeRay cluster before paying for it.

    python -m rayalign.plan --config jobs/configs/ppo_gpu.yaml            # the profile, and the same run at 10x
    python -m rayalign.plan --config jobs/configs/ppo_gpu.yaml --json     # one JSON object

A step generates ``prompts_per_step x n`` answers (decode-bound on the engines), judges each one (prefill-bound:
the rubric, the prompt and the answer go in, a few tokens come out) and trains on them (compute-bound: a forward
and backward over every token, plus a forward each for the reference and the old policy where the step needs
them). Each rate comes from `RATES`, whose every entry names its source; the README's table ("Capacity plan")
lists them. The plan is arithmetic on those rates, so it is as good as they are: measure a few steps on the real
cluster (MLflow's time/* metrics) and put the figures you get in their place (``--rates FILE.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

PARAMS = {  # parameters of the models the shipped profiles name (no download needed to plan)
    "smollm2-135m-instruct": 0.135e9,
    "meta-llama/Llama-3.1-8B-Instruct": 8.03e9,
    "meta-llama/Llama-3.3-70B-Instruct": 70.6e9,
    "meta-llama/Llama-3.1-70B-Instruct": 70.6e9,
}
"""Parameter counts by model name, from the models' own cards."""


@dataclasses.dataclass(frozen=True)
class Rate:
    value: float
    unit: str
    source: str


RATES: dict[str, Rate] = {
    "decode_tokens_per_s_8b_h100": Rate(
        12_500, "output tokens/s per engine (8B, bf16, 1 H100, large batch)",
        "third-party vLLM benchmarks compiled at morphllm.com/vllm-benchmarks (2026): Llama 3.1 8B BF16, 1x H100"),
    "decode_tokens_per_s_70b_h100": Rate(
        460, "output tokens/s per H100 (70B, batch 64)",
        "same compilation: Llama 3.1 70B FP8 on 1x H100 at batch 64; a TP4 bf16 replica is taken as 4x this"),
    "h100_bf16_flops": Rate(989e12, "dense bf16 FLOP/s per H100 SXM", "NVIDIA H100 datasheet (dense, no sparsity)"),
    "prefill_mfu": Rate(0.45, "share of peak FLOP/s a judge's prefill reaches",
                        "assumption: compute-bound prefill of long shared-prefix prompts; vLLM's prefix cache "
                        "(measured here: 4.4x faster judging on CPU with it) is not counted, so this is cautious"),
    "train_mfu": Rate(0.35, "share of peak FLOP/s the learner reaches",
                      "assumption within DeepSpeed's published ZeRO range (30-50% of peak for 7B-70B models on "
                      "A100/H100 clusters, DeepSpeed ZeRO and DeepSpeed-Chat blog posts)"),
    "sync_gb_per_s": Rate(20.0, "GB/s of weight sync to the engines (NCCL broadcast, or an adapter copy)",
                          "assumption: well below one NVLink / 200 Gb/s RDMA link; adapters make it negligible"),
    "judge_prompt_tokens": Rate(450, "tokens of a judge prompt before the prompt and answer",
                                "measured here: the vegetarian rubric with the SmolLM2 chat template"),
    "prompt_tokens": Rate(60, "tokens of a chat-templated training prompt",
                          "measured here: builtin:vegetarian/train with the SmolLM2 chat template (mean)"),
    "judge_output_tokens": Rate(4, "tokens a judge writes (score mode)", "rayalign's score mode: \"Score:\" pre-filled"),
}
"""The figures a plan rests on, each with its source."""


def _params(name: str, what: str) -> float:
    if name in PARAMS:
        return PARAMS[name]
    raise SystemExit(f"plan: {what} {name!r}: parameter count unknown; add it to rayalign.plan.PARAMS")


def plan(cfg: Any, rates: dict[str, Rate] = RATES, *, policy_params: float | None = None,
         scale_note: str = "") -> dict[str, Any]:
    """The plan of a PPO job config (``jobs/ppo.py``'s PPOJobConfig): tokens, seconds and GPUs per step."""
    r = {k: v.value for k, v in rates.items()}
    samples = cfg.trainer.prompts_per_step * cfg.sampling.n
    gen_len = cfg.sampling.max_new_tokens
    n_policy = policy_params or _params(cfg.model.name, "model.name")
    judge = cfg.reward.judge
    n_judge = _params(judge.model, "reward.judge.model") if judge.backend in ("vllm", "ray_serve_llm") else 0.0

    # decode: an engine of tp GPUs; a 70B-class model decodes at the 70B rate per GPU, smaller ones at the 8B rate
    def decode_rate(params: float, tp: int) -> float:
        return tp * (r["decode_tokens_per_s_70b_h100"] if params > 30e9 else r["decode_tokens_per_s_8b_h100"])

    tokens = {
        "policy_prompt": samples * r["prompt_tokens"],
        "policy_generated": samples * gen_len,
        "judge_prompt": samples * (r["judge_prompt_tokens"] + r["prompt_tokens"] + gen_len),
        "judge_generated": samples * r["judge_output_tokens"],
        "learner": samples * (r["prompt_tokens"] + gen_len),
    }
    engines, tp = cfg.engine.num_engines, cfg.engine.tensor_parallel_size
    generate_s = tokens["policy_generated"] / (engines * decode_rate(n_policy, tp))
    replicas, judge_tp = judge.max_replicas, judge.engine.tensor_parallel_size
    prefill_rate = judge_tp * r["h100_bf16_flops"] * r["prefill_mfu"] / (2 * n_judge) if n_judge else math.inf
    judge_s = (tokens["judge_prompt"] / (replicas * prefill_rate)
               + tokens["judge_generated"] / (replicas * decode_rate(n_judge, judge_tp))) if n_judge else 0.0
    # FLOPs per token: 2N forward; backward 4N for a full finetune, 2N for LoRA (no weight gradients of the base);
    # one extra forward each for the old policy (several epochs) and the reference (KL to it)
    backward = 2.0 if cfg.learner.finetune == "lora" else 4.0
    passes = 2.0 + backward + 2.0 * (cfg.algorithm.epochs > 1) + 2.0 * (cfg.algorithm.kl_coef > 0)
    learner_flops = tokens["learner"] * passes * n_policy * cfg.algorithm.epochs
    workers = cfg.learner.num_workers
    train_s = learner_flops / (workers * cfg.learner.num_gpus_per_worker * r["h100_bf16_flops"] * r["train_mfu"])
    sync_bytes = (2 * n_policy if cfg.learner.finetune == "full" or cfg.learner.lora_sync == "merged"
                  else 2 * n_policy * 0.005)  # an adapter of rank 64 on every projection: ~0.5% of the weights
    sync_s = sync_bytes / (r["sync_gb_per_s"] * 1e9)
    step_s = generate_s + judge_s + train_s + sync_s
    gpus = {"engines": engines * cfg.engine.num_gpus, "judge": replicas * judge.engine.num_gpus if n_judge else 0,
            "learner": workers * cfg.learner.num_gpus_per_worker}
    # for a pipelined loop (trainer.async_steps=1), stages overlap: each should take about the learner's time
    balanced = {"engines": max(1, math.ceil(engines * generate_s / train_s)),
                "judge_replicas": max(1, math.ceil(replicas * judge_s / train_s)) if n_judge else 0}
    return {
        "profile": f"{cfg.model.name} ({n_policy / 1e9:.3g}B) policy, "
                   + (f"{judge.model} ({n_judge / 1e9:.3g}B) judge" if n_judge else f"judge at {judge.url or 'an endpoint'}")
                   + (f"; {scale_note}" if scale_note else ""),
        "samples_per_step": samples,
        "tokens_per_step": {k: round(v) for k, v in tokens.items()},
        "seconds_per_step": {"generate": round(generate_s, 1), "judge": round(judge_s, 1), "train": round(train_s, 1),
                             "sync": round(sync_s, 2), "total_sequential": round(step_s, 1)},
        "gpus": {**gpus, "total": sum(gpus.values())},
        "balanced_for_async": balanced,
        "gpu_hours_per_1000_steps": round(sum(gpus.values()) * step_s * 1000 / 3600, 1),
    }


def scaled(cfg: Any, factor: int = 10) -> tuple[Any, float]:
    """The same run with a ~10x larger policy (70B) on proportionally more GPUs: engines of 4 GPUs (tensor
    parallel), 4x the learner workers (ZeRO-3 shards the weights over them), twice the judge replicas."""
    policy = "meta-llama/Llama-3.1-70B-Instruct"
    engine = dataclasses.replace(cfg.engine, tensor_parallel_size=4, num_gpus=4)
    learner = dataclasses.replace(cfg.learner, num_workers=cfg.learner.num_workers * 4, zero_stage=3)
    judge = dataclasses.replace(cfg.reward.judge, max_replicas=cfg.reward.judge.max_replicas * 2,
                                num_replicas=cfg.reward.judge.num_replicas * 2)
    out = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=policy), engine=engine, learner=learner,
                              reward=dataclasses.replace(cfg.reward, judge=judge))
    return out, _params(policy, "policy") * factor / 10


def render(p: dict[str, Any]) -> str:
    t, s, g, b = p["tokens_per_step"], p["seconds_per_step"], p["gpus"], p["balanced_for_async"]
    return "\n".join([
        p["profile"],
        f"  per step: {p['samples_per_step']} samples; tokens: policy {t['policy_prompt']:,} in + "
        f"{t['policy_generated']:,} out, judge {t['judge_prompt']:,} in + {t['judge_generated']:,} out, "
        f"learner {t['learner']:,}",
        f"  seconds: generate {s['generate']}, judge {s['judge']}, train {s['train']}, sync {s['sync']} "
        f"-> {s['total_sequential']} s a step run in sequence",
        f"  GPUs: engines {g['engines']:g}, judge {g['judge']:g}, learner {g['learner']:g} = {g['total']:g}; "
        f"{p['gpu_hours_per_1000_steps']:,} GPU-hours per 1,000 steps",
        f"  to keep pace with the learner when the stages overlap: {b['engines']} engine(s), "
        f"{b['judge_replicas']} judge replica(s)",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rayalign.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a jobs/ppo.py config (a GPU profile)")
    parser.add_argument("--rates", help="JSON {name: value} replacing entries of rayalign.plan.RATES (measured ones)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text plan")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    from ppo import PPOJobConfig

    from rayalign.config import ConfigError, load_config

    try:
        cfg = load_config(PPOJobConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    rates = dict(RATES)
    if args.rates:
        for k, v in json.loads(Path(args.rates).read_text()).items():
            if k not in rates:
                print(f"plan: --rates: unknown rate {k!r} (known: {', '.join(sorted(rates))})", file=sys.stderr)
                return 2
            rates[k] = dataclasses.replace(rates[k], value=float(v), source=f"{args.rates}")
    if cfg.learner.num_gpus_per_worker == 0:
        print("plan: the config trains on CPU (learner.num_gpus_per_worker=0); plan a GPU profile", file=sys.stderr)
        return 2
    big, params = scaled(cfg)
    plans = [plan(cfg, rates), plan(big, rates, policy_params=params, scale_note="10x: a 70B policy")]
    if args.json:
        print(json.dumps({"plans": plans, "rates": {k: dataclasses.asdict(v) for k, v in rates.items()}}))
    else:
        print("\n\n".join(render(p) for p in plans))
    return 0


if __name__ == "__main__":
    sys.exit(main())
