"""One epoch of DPO on CPU: rayalign's `jobs/dpo.py` vs TRL's `DPOTrainer`, training tokens per second.

Both sides train the same model (the embedded SmolLM2-135M unless --model) with the same LoRA adapter (rank 16,
alpha 32, dropout 0, on q/k/v/o/gate/up/down), lr 5e-4, beta 0.1 (sigmoid loss), on the same --pairs pairs of
the shipped vegetarian set (conversational rows, so both apply the chat template), one epoch in optimizer steps of
--minibatch pairs made of micro-batches of --micro pairs (chosen and rejected of a pair in one forward on both
sides), max length 512, float32, gradient checkpointing off, dropout off.

The difference under test is structural: rayalign computes the reference's logprobs once, in a pass before
training, and pads each micro-batch to its own longest row; TRL (by default) runs the reference -- the policy with
its adapter disabled -- again in every step. TRL's `precompute_ref_log_probs=True` does the pass once too: it is
measured as a second TRL run, so the figure says how much of the gap that option alone closes.

Timing: rayalign = its reference pass + every step's `learner.train` call (MLflow `time/reference_pass`,
`time/train`); TRL = every step, on_step_begin .. on_step_end (a TrainerCallback), plus its reference precompute
when on. Model loading, tokenization and the final save are left out on both sides. Tokens are the pairs' prompt +
response tokens (both rows of a pair, no padding) as each side tokenized them; the counts are printed and must agree
within 2 %. Each side runs in its own subprocess with the machine to itself, rayalign first.
Last stdout line: one JSON object with the figures and
  ratios.tokens_per_s_vs_trl             rayalign / TRL default (target >= 1.3)
  ratios.tokens_per_s_vs_trl_precomputed rayalign / TRL with precompute_ref_log_probs=True

    python benchmarks/dpo_vs_trl.py [--pairs 64] [--minibatch 8] [--micro 4] [--no-precomputed] [--override K=V]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import run_logged  # noqa: E402  (benchmarks/harness.py, beside this script)

LORA_RANK, LORA_ALPHA = 16, 32
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, BETA, MAX_LENGTH, SEED = 5e-4, 0.1, 512, 0


def write_pairs(n: int, path: Path) -> None:
    """The first ``n`` shipped vegetarian pairs as conversational rows (TRL's form; rayalign reads it too)."""
    from rayalign.data.preferences import load_preferences

    examples = load_preferences("builtin:vegetarian/pairs", limit=n).examples
    if len(examples) < n:
        raise SystemExit(f"--pairs {n}: the shipped set has only {len(examples)} usable pairs")
    with open(path, "w") as f:
        for e in examples:
            f.write(json.dumps({"prompt": [{"role": r, "content": c} for r, c in e.prompt],
                                "chosen": [{"role": "assistant", "content": e.chosen}],
                                "rejected": [{"role": "assistant", "content": e.rejected}]}) + "\n")


# -- rayalign ---------------------------------------------------------------------------------------------------

def bench_rayalign(args, data: Path, workdir: Path) -> dict:
    experiment = "bench-dpo-vs-trl"
    cmd = [sys.executable, str(ROOT / "jobs" / "dpo.py"), f"model.name={args.model}", f"data.train={data}",
           "data.eval_fraction=0", f"data.max_length={MAX_LENGTH}", "algorithm.name=dpo", f"algorithm.beta={BETA}",
           "algorithm.epochs=1", f"algorithm.minibatch_size={args.minibatch}", f"learner.micro_batch_size={args.micro}",
           f"learner.lr={LR}", f"lora.rank={LORA_RANK}", f"lora.alpha={LORA_ALPHA}", "lora.dropout=0",
           f"trainer.seed={SEED}", "trainer.total_steps=0", "trainer.checkpoint_every=0", "trainer.eval_every=0",
           "heldout.enabled=false", f"tracking.experiment={experiment}", *args.override]
    wall = run_logged(cmd, workdir, workdir / "rayalign.log", "rayalign (jobs/dpo.py)")

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]

    def series(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]

    train, rates = series("time/train"), series("tokens_per_second")
    steps = args.pairs // args.minibatch
    if len(train) != steps or len(rates) != steps:
        raise SystemExit(f"rayalign: expected {steps} steps in MLflow, found {len(train)}")
    reference = series("time/reference_pass")[0]
    tokens = sum(t * r for t, r in zip(train, rates))
    return {"tokens": round(tokens), "reference_seconds": reference, "train_seconds": sum(train),
            "steps_seconds": train, "seconds": reference + sum(train), "job_wall_seconds": wall,
            "final_loss": series("train/loss")[-1], "final_accuracy": series("train/rewards/accuracy")[-1]}


# -- TRL (run in its own process: `--trl-worker OUT.json`) ------------------------------------------------------

def trl_worker(args, data: Path, out_path: Path) -> None:
    import torch

    torch.set_num_threads(os.cpu_count())
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from rayalign.models import resolve_model

    model_path = resolve_model(args.model)
    dataset = load_dataset("json", data_files=str(data), split="train")
    config = DPOConfig(
        output_dir=str(out_path.parent / "trl-output"), use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=args.micro, gradient_accumulation_steps=args.minibatch // args.micro,
        num_train_epochs=1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"], max_length=MAX_LENGTH, gradient_checkpointing=False,
        precompute_ref_log_probs=args.precompute, seed=SEED, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, dataset_num_proc=None,
    )
    lora = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    clock = {"t0": 0.0, "precompute": 0.0}
    steps: list[float] = []
    history: list[dict] = []
    original_precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return original_precompute(self, *a, **kw)
        finally:
            clock["precompute"] += time.perf_counter() - t0

    DPOTrainer._precompute_ref_logps = timed_precompute

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            clock["t0"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            steps.append(time.perf_counter() - clock["t0"])

        def on_log(self, a, state, control, logs=None, **kw):
            if logs:
                history.append(dict(logs))

    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora, callbacks=[StepTimer()])
    prepared = trainer.train_dataset
    tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in prepared)
    trainer.train()
    expected = args.pairs // args.minibatch
    if len(steps) != expected:
        raise SystemExit(f"TRL: timed {len(steps)} steps, expected {expected}")
    losses = [entry for entry in history if "loss" in entry]
    out_path.write_text(json.dumps({
        "tokens": tokens, "reference_seconds": clock["precompute"], "train_seconds": sum(steps),
        "steps_seconds": steps, "seconds": clock["precompute"] + sum(steps), "threads": torch.get_num_threads(),
        "final_loss": losses[-1]["loss"] if losses else None,
        "final_accuracy": losses[-1].get("rewards/accuracies") if losses else None,
    }))


def bench_trl(args, data: Path, workdir: Path, precompute: bool) -> dict:
    tag = "trl_precomputed" if precompute else "trl"
    out = workdir / f"{tag}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(out), "--data", str(data),
           "--model", args.model, "--pairs", str(args.pairs), "--minibatch", str(args.minibatch),
           "--micro", str(args.micro), *(["--precompute"] if precompute else [])]
    run_logged(cmd, workdir, workdir / f"{tag}.log",
               "TRL DPOTrainer" + (" (precompute_ref_log_probs=True)" if precompute else ""))
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=64, help="pairs in the epoch (a multiple of --minibatch)")
    parser.add_argument("--minibatch", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--micro", type=int, default=4, help="pairs per forward (micro-batch)")
    parser.add_argument("--no-precomputed", action="store_true",
                        help="skip the second TRL run (precompute_ref_log_probs=True)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a jobs/dpo.py override for rayalign's side, e.g. learner.shared_prompt=false (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, MLflow store)")
    parser.add_argument("--trl-worker", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--precompute", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pairs % args.minibatch or args.minibatch % args.micro:
        parser.error("--pairs must be a multiple of --minibatch, and --minibatch of --micro")
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if args.trl_worker:
        trl_worker(args, Path(args.data), Path(args.trl_worker))
        return

    import trl

    workdir = Path(tempfile.mkdtemp(prefix="dpo_vs_trl-"))
    load = {"start": os.getloadavg()[0]}  # 1-minute load average: other work on the machine skews both sides
    results: dict[str, dict] = {}
    try:
        data = workdir / "pairs.jsonl"
        write_pairs(args.pairs, data)
        results["rayalign"] = bench_rayalign(args, data, workdir)
        load["after_rayalign"] = os.getloadavg()[0]
        results["trl"] = bench_trl(args, data, workdir, precompute=False)
        load["after_trl"] = os.getloadavg()[0]
        if not args.no_precomputed:
            results["trl_precomputed"] = bench_trl(args, data, workdir, precompute=True)
            load["after_trl_precomputed"] = os.getloadavg()[0]
    finally:
        if args.keep:
            print(f"kept {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    ours = results["rayalign"]
    for name, r in results.items():
        r["tokens_per_second"] = r["tokens"] / r["seconds"]
        print(f"{name}: {r['tokens']} tokens in {r['seconds']:.1f} s (reference {r['reference_seconds']:.1f} s, "
              f"steps {r['train_seconds']:.1f} s) = {r['tokens_per_second']:.0f} tokens/s", flush=True)
        if abs(r["tokens"] - ours["tokens"]) > 0.02 * ours["tokens"]:
            raise SystemExit(f"{name} tokenized {r['tokens']} tokens, rayalign {ours['tokens']}: not the same work")
    ratios = {"tokens_per_s_vs_trl": ours["tokens_per_second"] / results["trl"]["tokens_per_second"]}
    if "trl_precomputed" in results:
        ratios["tokens_per_s_vs_trl_precomputed"] = (ours["tokens_per_second"]
                                                     / results["trl_precomputed"]["tokens_per_second"])
    print("rayalign / TRL tokens/s: %.3f (target >= 1.3)" % ratios["tokens_per_s_vs_trl"], flush=True)
    r3 = lambda x: round(x, 3) if isinstance(x, float) else x  # noqa: E731
    print(json.dumps({
        "benchmark": "dpo_vs_trl",
        "config": {"model": args.model, "rayalign_overrides": args.override, "pairs": args.pairs, "steps": args.pairs // args.minibatch,
                   "minibatch_pairs": args.minibatch, "micro_batch_pairs": args.micro, "max_length": MAX_LENGTH,
                   "lora_rank": LORA_RANK, "lora_alpha": LORA_ALPHA, "lr": LR, "beta": BETA, "dtype": "float32",
                   "trl_version": trl.__version__, "cpu_count": os.cpu_count(),
                   "load_average_1m": {k: round(v, 2) for k, v in load.items()}},
        **{name: {k: ([r3(x) for x in v] if isinstance(v, list) else r3(v)) for k, v in r.items()}
           for name, r in results.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
    }))


if __name__ == "__main__":
    main()
