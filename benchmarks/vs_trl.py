"""One GRPO step on CPU: rayalign's `jobs/ppo.py` vs TRL's `GRPOTrainer` with its default generation (HF `generate`).

Both sides train the same model (the embedded SmolLM2-135M unless --model) with the same LoRA adapter (rank 16,
alpha 32, dropout 0, on q/k/v/o/gate/up/down), lr 5e-5, the k3 KL estimate in the loss with coefficient 0.05
(TRL: beta=0.05, so it too computes reference logprobs, with the adapter disabled; --kl-coef 0: neither side runs
a reference, TRL's own default), on the same prompts (the
ones rayalign's step k trains on, fed to TRL in that order as chat messages, so both use the chat template),
rewarded by the same rule
(`vegetarian_lexicon`), with one optimizer step per RL step of --prompts x --generations completions in
micro-batches of 4, and fixed-length responses of --max-new-tokens at temperature 1.0
(rayalign: vLLM `ignore_eos`; TRL: `generation_kwargs={"min_new_tokens": N}` with `max_completion_length=N`).
The learners train in float32 on both sides (rayalign's learner default; TRL's model is loaded in float32 with
bf16=False and gradient checkpointing off, as rayalign's learner); rayalign samples in bf16 on vLLM, TRL with HF
generate on its float32 training model.

rayalign runs first, as `jobs/ppo.py` in a subprocess in a temporary directory; its per-step phase times are read
back from the MLflow store there. TRL runs second, in its own subprocess, all cores for torch; its steps are timed
with a TrainerCallback (on_step_begin .. on_step_end) and its HF generate calls by wrapping the model's `generate`.
Step times are the mean over steps 2..N (step 1 includes warm-up), so --steps must be >= 2.
Last stdout line: one JSON object with the figures and
  ratios.step_time_vs_trl   rayalign step seconds / TRL step seconds (target <= 0.5)

    python benchmarks/vs_trl.py [--steps 3] [--prompts 4] [--generations 4] [--max-new-tokens 64] [--kl-coef 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import run_logged  # noqa: E402  (benchmarks/harness.py, beside this script)

LORA_RANK, LORA_ALPHA = 16, 32
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, TEMPERATURE, MICRO_BATCH, SEED = 5e-5, 1.0, 4, 0
RULE = "vegetarian_lexicon"
PHASES = ("generate", "judge", "logprobs", "train", "sync")


def mean_after_first(values: list[float]) -> float:
    return statistics.fmean(values[1:])


def step_prompts(steps: int, per_step: int) -> list[list[str]]:
    """The prompts rayalign's steps 1..N train on (its default seed), one list per step."""
    from rayalign.data.prompts import load_prompts, prompt_indices

    pool = load_prompts("builtin:vegetarian/train").prompts
    return [[pool[i] for i in prompt_indices(len(pool), per_step, step, SEED)] for step in range(1, steps + 1)]


# -- rayalign ---------------------------------------------------------------------------------------------------

def bench_rayalign(args, workdir: Path) -> dict[str, float]:
    experiment = "bench-vs-trl"
    cmd = [sys.executable, str(ROOT / "jobs" / "ppo.py"), f"model.name={args.model}", "algorithm.name=grpo",
           "algorithm.dynamic_sampling=false", f"sampling.n={args.generations}", f"trainer.prompts_per_step={args.prompts}",
           f"sampling.max_new_tokens={args.max_new_tokens}", "sampling.ignore_eos=true",
           f"sampling.temperature={TEMPERATURE}", f"algorithm.minibatch_size={args.prompts * args.generations}",
           f"learner.micro_batch_size={MICRO_BATCH}", "algorithm.kl_in=loss", f"algorithm.kl_coef={args.kl_coef}",
           f"lora.rank={LORA_RANK}", f"lora.alpha={LORA_ALPHA}", f"learner.lr={LR}", f"trainer.seed={SEED}",
           f"trainer.total_steps={args.steps}", "trainer.checkpoint_every=0",
           f"reward.components=[{{name: lexicon, kind: rule, weight: 1.0, rule: {RULE}}}]",
           f"tracking.experiment={experiment}"]
    run_logged(cmd, workdir, workdir / "rayalign.log", "rayalign (jobs/ppo.py)")

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]

    def series(key: str) -> list[float]:
        hist = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        values = [m.value for m in hist if m.step >= 1]
        if len(values) != args.steps:
            raise SystemExit(f"rayalign: expected {args.steps} values of {key}, MLflow has {len(values)}")
        return values

    out = {"step_seconds": mean_after_first(series("time/step"))}
    out.update({phase: mean_after_first(series(f"time/{phase}")) for phase in PHASES})
    out["response_length"] = mean_after_first(series("response_length/mean"))
    out["steps_seconds"] = series("time/step")
    return out


# -- TRL (run in its own process: `--trl-worker OUT.json`) ------------------------------------------------------

def trl_worker(args, out_path: Path) -> None:
    import torch

    torch.set_num_threads(os.cpu_count())
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rayalign.judge.rules import RULES
    from rayalign.models import resolve_model

    model_path = resolve_model(args.model)
    rule = RULES[RULE]

    def reward(prompts, completions, **kwargs) -> list[float]:
        # conversational data: a prompt is a list of messages, a completion [{"role": "assistant", "content": ...}]
        return [rule(p[-1]["content"], c[0]["content"]) for p, c in zip(prompts, completions, strict=True)]

    prompts = [p for step in step_prompts(args.steps, args.prompts) for p in step]
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    batch = args.prompts * args.generations
    config = GRPOConfig(
        output_dir=str(out_path.parent / "trl-output"), use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=batch // MICRO_BATCH,
        num_generations=args.generations,  # -> generation_batch_size = 16 = one optimizer step's completions
        max_completion_length=args.max_new_tokens, temperature=TEMPERATURE, top_p=1.0,
        generation_kwargs={"min_new_tokens": args.max_new_tokens},  # fixed length: EOS suppressed until N tokens
        learning_rate=LR, beta=args.kl_coef, gradient_checkpointing=False, shuffle_dataset=False, seed=SEED,
        max_steps=args.steps, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0,
    )
    lora = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    steps: list[float] = []
    gen_per_step: list[float] = []
    rollout_per_step: list[float] = []
    lengths: list[float] = []
    clock = {"gen": 0.0, "rollout": 0.0, "t0": 0.0}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            clock.update(gen=0.0, rollout=0.0, t0=time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            steps.append(time.perf_counter() - clock["t0"])
            gen_per_step.append(clock["gen"])
            rollout_per_step.append(clock["rollout"])

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora, callbacks=[StepTimer()])

    # HF generate: wrap the unwrapped (PEFT) model's generate; the whole rollout (generate + reward + reference
    # logprobs, TRL's _generate_and_score_completions) separately.
    gen_cls = type(trainer.accelerator.unwrap_model(trainer.model))
    original_generate = gen_cls.generate

    def timed_generate(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return original_generate(self, *a, **kw)
        finally:
            clock["gen"] += time.perf_counter() - t0

    gen_cls.generate = timed_generate
    original_rollout = trainer._generate_and_score_completions

    def timed_rollout(*a, **kw):
        t0 = time.perf_counter()
        try:
            return original_rollout(*a, **kw)
        finally:
            clock["rollout"] += time.perf_counter() - t0

    trainer._generate_and_score_completions = timed_rollout
    trainer.train()
    if len(steps) != args.steps or not all(gen_per_step):
        raise SystemExit(f"TRL: timed {len(steps)} steps, generate seen in {sum(map(bool, gen_per_step))}")
    step_s = mean_after_first(steps)
    gen_s = mean_after_first(gen_per_step)
    rollout_s = mean_after_first(rollout_per_step)
    out_path.write_text(json.dumps({
        "step_seconds": step_s, "generate_seconds": gen_s,
        "rollout_seconds": rollout_s,  # generate + reward + reference logprobs
        "rest_seconds": step_s - gen_s, "response_length": mean_after_first(lengths) if len(lengths) > 1 else None,
        "steps_seconds": steps, "threads": torch.get_num_threads(),
        "generation_kwargs": trainer.generation_kwargs,
    }, default=str))


def bench_trl(args, workdir: Path) -> dict:
    out = workdir / "trl.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(out), "--model", args.model,
           "--steps", str(args.steps), "--prompts", str(args.prompts), "--generations", str(args.generations),
           "--max-new-tokens", str(args.max_new_tokens), "--kl-coef", str(args.kl_coef)]
    run_logged(cmd, workdir, workdir / "trl.log", "TRL GRPOTrainer")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3, help="RL steps per side; the mean is over steps 2..N")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=4, help="responses per prompt (the GRPO group)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per response (fixed length)")
    parser.add_argument("--kl-coef", type=float, default=0.05,
                        help="KL coefficient, both sides (0: neither keeps nor runs a reference, TRL's default)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, MLflow store)")
    parser.add_argument("--trl-worker", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (step 1 is warm-up)")
    if (args.prompts * args.generations) % MICRO_BATCH:
        parser.error(f"--prompts x --generations must be a multiple of {MICRO_BATCH}")
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if args.trl_worker:
        trl_worker(args, Path(args.trl_worker))
        return

    import trl

    workdir = Path(tempfile.mkdtemp(prefix="vs_trl-"))
    load = {"start": os.getloadavg()[0]}  # 1-minute load average: other work on the machine skews both sides
    try:
        ray_res = bench_rayalign(args, workdir)
        load["after_rayalign"] = os.getloadavg()[0]
        print("rayalign: step %.1f s (generate %.1f, judge %.2f, logprobs %.1f, train %.1f, sync %.1f), "
              "response length %.0f" % (ray_res["step_seconds"], *(ray_res[p] for p in PHASES),
                                        ray_res["response_length"]), flush=True)
        trl_res = bench_trl(args, workdir)
        load["after_trl"] = os.getloadavg()[0]
        print("TRL %s: step %.1f s (HF generate %.1f, rollout incl. generate/reward/ref logprobs %.1f), "
              "response length %s" % (trl.__version__, trl_res["step_seconds"], trl_res["generate_seconds"],
                                      trl_res["rollout_seconds"], trl_res["response_length"]), flush=True)
    finally:
        if args.keep:
            print(f"kept {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    ratio = ray_res["step_seconds"] / trl_res["step_seconds"]
    print(f"rayalign / TRL step time: {ratio:.3f} (target <= 0.5)", flush=True)
    r3 = lambda x: round(x, 3)  # noqa: E731
    print(json.dumps({
        "benchmark": "vs_trl",
        "config": {"model": args.model, "steps": args.steps, "timed_steps": f"2..{args.steps}",
                   "prompts": args.prompts, "generations": args.generations,
                   "completions_per_step": args.prompts * args.generations, "micro_batch": MICRO_BATCH,
                   "max_new_tokens": args.max_new_tokens, "fixed_length": True, "temperature": TEMPERATURE,
                   "lora_rank": LORA_RANK, "lora_alpha": LORA_ALPHA, "lr": LR, "kl_coef": args.kl_coef, "reward": RULE,
                   "trl_version": trl.__version__, "cpu_count": os.cpu_count(),
                   "load_average_1m": {k: round(v, 2) for k, v in load.items()}},
        "rayalign": {"step_seconds": r3(ray_res["step_seconds"]), **{p: r3(ray_res[p]) for p in PHASES},
                     "response_length": ray_res["response_length"],
                     "steps_seconds": [r3(s) for s in ray_res["steps_seconds"]]},
        "trl": {"step_seconds": r3(trl_res["step_seconds"]), "generate_seconds": r3(trl_res["generate_seconds"]),
                "rollout_seconds": r3(trl_res["rollout_seconds"]), "rest_seconds": r3(trl_res["rest_seconds"]),
                "response_length": trl_res["response_length"], "threads": trl_res["threads"],
                "steps_seconds": [r3(s) for s in trl_res["steps_seconds"]]},
        "ratios": {"step_time_vs_trl": r3(ratio)},
    }))


if __name__ == "__main__":
    main()
