"""The RL learner's step on CPU, padded rows vs packed rows (`learner.packing`: no padding, and a GRPO group's
prompt run once for its answers), on the real learner (Ray Train + DeepSpeed, SmolLM2-135M with the default job's
LoRA adapter).

The batch is shaped like a step of the default `jobs/ppo.py`: --prompts held-in food prompts x --generations
answers, in the chat template, each answer real text from the shipped preference pairs cut at --max-new-tokens
(so the rows differ in prompt and answer length, as sampled ones do). Each learner call is what that step's
learner phase runs: one `train` with the single-pass step (the reference logprobs, adapter off, and the training
forward/backward in the same micro-batches, one optimizer step), in micro-batches of the job's size, over one
shuffled minibatch (`minibatch_plan`).

Two learners run side by side, one padding (learner.packing=false), one packing; each repeat times one call on
each, in alternating order, so a slow spell on this shared machine hits both alike. Figures are medians over
repeats; the ratio is the median of the per-repeat ratios, printed with its spread. Tokens/s counts the batch's
real tokens (prompt + answer), the same for both. One untimed call each first (allocator and thread warm-up).
Last stdout line: one JSON object with
  ratios.packed_vs_padded_time   packed seconds / padded seconds per step (< 1: packing is faster)

    python benchmarks/learner.py [--repeats 3] [--prompts 4] [--generations 4] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def step_batch(model_path: str, prompts: int, generations: int, max_new_tokens: int, seed: int = 0) -> list:
    """One default-shaped step's rollouts: ``prompts`` training prompts x ``generations`` shipped answers each."""
    from transformers import AutoTokenizer

    from rayalign.data.prompts import dataset_path, load_prompts
    from rayalign.types import Rollout

    tok = AutoTokenizer.from_pretrained(model_path)
    rng = random.Random(seed)
    pool = load_prompts("builtin:vegetarian/train").prompts
    answers = []
    for line in dataset_path("builtin:vegetarian/pairs").read_text().splitlines():
        row = json.loads(line)
        answers += [row["chosen"], row["rejected"]]
    rollouts = []
    for prompt in rng.sample(pool, prompts):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
        for answer in rng.sample(answers, generations):
            response = tok(answer, add_special_tokens=False)["input_ids"][:max_new_tokens]
            rollouts.append(Rollout(prompt, answer, tuple(ids), tuple(response), tuple([-1.0] * len(response)),
                                    "length", 0, 0))
    return rollouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side (interleaved); the median")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (the default job's 4)")
    parser.add_argument("--generations", type=int, default=4, help="answers per prompt (the default job's 4)")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="answers cut at this many tokens")
    args = parser.parse_args()
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")

    import ray
    import torch

    from jobs.ppo import PPOJobConfig
    from rayalign.learner.batch import minibatch_plan, pad_rollouts
    from rayalign.learner.group import Learner
    from rayalign.models import resolve_model

    cfg = PPOJobConfig()
    model_path = resolve_model(cfg.model.name)
    rollouts = step_batch(model_path, args.prompts, args.generations, args.max_new_tokens)
    n = len(rollouts)
    algo = dataclasses.replace(cfg.algorithm, minibatch_size=n)
    batch = pad_rollouts(rollouts)
    batch["advantages"] = torch.randn(batch["response_mask"].shape, generator=torch.Generator().manual_seed(0))
    batch["advantages"] *= batch["response_mask"]
    real_tokens = int(batch["attention_mask"].sum())
    print(f"batch: {n} rows, {real_tokens} real tokens, {batch['input_ids'].numel()} padded to the longest row; "
          f"micro-batches of {cfg.learner.micro_batch_size}", flush=True)

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="rayalign-bench-learner-")
    learners = {}
    try:
        for name, packing in (("padded", False), ("packed", True)):
            learners[name] = Learner(model_path, learner=dataclasses.replace(cfg.learner, packing=packing),
                                     lora=cfg.lora, algorithm=algo, storage_path=storage, run_name=name,
                                     seed=0)
            learners[name].setup()
        ref = ray.put(batch)
        generator = torch.Generator().manual_seed(0)
        seconds = {name: [] for name in learners}

        def step(name: str) -> float:
            # as the job plans: a prompt's samples in the same micro-batches when packing (its prompt runs once)
            groups = [r.prompt for r in rollouts] if name == "packed" else None
            plan = minibatch_plan(n, n, 1, cfg.learner.micro_batch_size, 1, generator, groups=groups)
            t0 = time.perf_counter()
            learners[name].train(ref, plan, cfg.sampling.temperature, cfg.algorithm.kl_coef, single_pass=True)
            return time.perf_counter() - t0

        for name in learners:
            step(name)  # warm-up, untimed
        for repeat in range(args.repeats):
            order = list(learners) if repeat % 2 == 0 else list(reversed(learners))
            for name in order:
                seconds[name].append(step(name))
            print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in
                                                                       seconds.items()), flush=True)
    finally:
        for learner in learners.values():
            learner.shutdown()
        ray.shutdown()

    per_repeat = [p / q for p, q in zip(seconds["packed"], seconds["padded"])]
    median = {name: statistics.median(v) for name, v in seconds.items()}
    print(json.dumps({
        "rows": n, "real_tokens": real_tokens, "padded_tokens": int(batch["input_ids"].numel()),
        "micro_batch_size": cfg.learner.micro_batch_size, "repeats": args.repeats,
        "seconds": {name: round(s, 3) for name, s in median.items()},
        "seconds_all_repeats": {name: [round(s, 2) for s in v] for name, v in seconds.items()},
        "learner_tokens_per_s": {name: round(real_tokens / s, 1) for name, s in median.items()},
        "packed_vs_padded_spread": [round(min(per_repeat), 3), round(max(per_repeat), 3)],
        "ratios": {"packed_vs_padded_time": round(statistics.median(per_repeat), 3)},
    }))


if __name__ == "__main__":
    main()
