"""One epoch of SFT on CPU: rayalign's `jobs/sft.py` vs TRL's `SFTTrainer`, training tokens per second.

Both sides train the same model (the embedded SmolLM2-135M unless --model) with the same LoRA adapter (rank 16,
alpha 32, dropout 0, on q/k/v/o/gate/up/down), lr 2e-4, on the same --examples rows (the shipped pipeline pairs'
chosen answers, as conversational prompt/completion rows, so both apply the chat template), the loss on the
completion tokens alone, max length 512, float32, gradient checkpointing off, one epoch.

What differs is how each side lays out the work, each at its defaults: rayalign packs the examples into rows of 512
tokens (positions restarted, attention run on each example alone: `rayalign.learner.packing.segment_attention`)
and runs the LM head only at the positions that predict a response token; TRL pads each micro-batch of --micro
examples to its longest and computes its loss with its fused, chunked LM head. With --trl-packed, a TRL run with
`packing=True` (its best-fit-decreasing packing, padding-free with position ids) is measured too, once, after the
repeats; on CPU (no flash attention) HF's SDPA attention may not see the position ids as boundaries, so it is
there to show where the time goes, not as a like-for-like baseline.

Timing: rayalign = every step's `learner.train` call (MLflow `time/train`); TRL = every step, on_step_begin ..
on_step_end (a TrainerCallback). Model loading, tokenization and the final save are left out on both sides. Tokens
are the examples' prompt + completion tokens (no padding) as each side tokenized them; the counts are printed and
must agree within 2 %. Each side runs in its own subprocess with the machine to itself. These 2-core machines are
shared and their speed drifts by several times within minutes, so the two sides alternate, --repeats times
(rayalign, TRL, rayalign, TRL, ...), and the ratio is the median of the repeats' ratios, their spread printed.
Last stdout line: one JSON object with the figures and
  ratios.tokens_per_s_vs_trl          median over repeats of rayalign / TRL default tokens/s (target >= 1.3)
  ratios.tokens_per_s_vs_trl_packed   rayalign (median) / TRL packing=True (with --trl-packed; see above)

    python benchmarks/sft_vs_trl.py [--examples 64] [--repeats 3] [--rows 4] [--micro 4] [--accumulation 2]
                                    [--trl-packed]
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
LR, MAX_LENGTH, SEED = 2e-4, 512, 0


def write_rows(n: int, path: Path) -> None:
    """The first ``n`` shipped pipeline pairs' chosen answers as conversational prompt/completion rows."""
    from rayalign.data.preferences import load_sft

    examples = load_sft("builtin:vegetarian/pipeline_pairs", column="chosen", limit=n).examples
    if len(examples) < n:
        raise SystemExit(f"--examples {n}: the shipped set has only {len(examples)} usable rows")
    with open(path, "w") as f:
        for e in examples:
            f.write(json.dumps({"prompt": [{"role": r, "content": c} for r, c in e.prompt],
                                "completion": [{"role": "assistant", "content": e.chosen}]}) + "\n")


# -- rayalign ---------------------------------------------------------------------------------------------------

def bench_rayalign(args, data: Path, workdir: Path) -> dict:
    experiment = "bench-sft-vs-trl"
    cmd = [sys.executable, str(ROOT / "jobs" / "sft.py"), f"model.name={args.model}", f"data.train={data}",
           "data.response_column=completion", "data.eval_fraction=0", f"data.max_length={MAX_LENGTH}",
           "algorithm.epochs=1", f"algorithm.minibatch_size={args.rows}", "learner.micro_batch_size=1",
           f"learner.lr={LR}", f"lora.rank={LORA_RANK}", f"lora.alpha={LORA_ALPHA}", "lora.dropout=0",
           f"trainer.seed={SEED}", "trainer.total_steps=0", "trainer.checkpoint_every=0", "trainer.eval_every=0",
           "heldout.enabled=false", f"tracking.experiment={experiment}", *args.override]
    wall = run_logged(cmd, workdir, workdir / "rayalign.log", "rayalign (jobs/sft.py)")

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]

    def series(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]

    train, rates = series("time/train"), series("tokens_per_second")
    rows = int(run.data.metrics["data/train_rows"])
    if len(train) != -(-rows // args.rows):
        raise SystemExit(f"rayalign: {rows} packed rows, {len(train)} steps in MLflow")
    return {"tokens": round(sum(t * r for t, r in zip(train, rates))), "train_seconds": sum(train),
            "steps_seconds": train, "seconds": sum(train), "job_wall_seconds": wall, "rows": rows,
            "pack_fill": run.data.metrics["data/pack_fill"], "final_loss": series("train/loss")[-1]}


# -- TRL (run in its own process: `--trl-worker OUT.json`) ------------------------------------------------------

def trl_worker(args, data: Path, out_path: Path) -> None:
    import torch

    torch.set_num_threads(os.cpu_count())
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from rayalign.models import resolve_model

    model_path = resolve_model(args.model)
    dataset = load_dataset("json", data_files=str(data), split="train")
    config = SFTConfig(
        output_dir=str(out_path.parent / "trl-output"), use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=args.micro, gradient_accumulation_steps=args.accumulation,
        num_train_epochs=1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, max_length=MAX_LENGTH, packing=args.packed, completion_only_loss=True,
        gradient_checkpointing=False, seed=SEED, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, dataset_num_proc=None,
    )
    lora = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    clock = {"t0": 0.0}
    steps: list[float] = []
    history: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            clock["t0"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            steps.append(time.perf_counter() - clock["t0"])

        def on_log(self, a, state, control, logs=None, **kw):
            if logs:
                history.append(dict(logs))

    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora, callbacks=[StepTimer()])
    prepared = trainer.train_dataset
    tokens = sum(len(r["input_ids"]) for r in prepared)
    trainer.train()
    losses = [entry for entry in history if "loss" in entry]
    out_path.write_text(json.dumps({
        "tokens": tokens, "train_seconds": sum(steps), "steps_seconds": steps, "seconds": sum(steps),
        "rows": len(prepared), "threads": torch.get_num_threads(),
        "final_loss": losses[-1]["loss"] if losses else None,
    }))


def bench_trl(args, data: Path, workdir: Path, packed: bool) -> dict:
    tag = "trl_packed" if packed else "trl"
    out = workdir / f"{tag}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(out), "--data", str(data),
           "--model", args.model, "--micro", str(args.micro), "--accumulation", str(args.accumulation),
           *(["--packed"] if packed else [])]
    run_logged(cmd, workdir, workdir / f"{tag}.log", "TRL SFTTrainer" + (" (packing=True)" if packed else ""))
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--examples", type=int, default=64, help="rows in the epoch")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rayalign/TRL pairs; the median ratio")
    parser.add_argument("--rows", type=int, default=4, help="rayalign: packed rows (of 512 tokens) per step")
    parser.add_argument("--micro", type=int, default=4, help="TRL: examples per forward")
    parser.add_argument("--accumulation", type=int, default=2, help="TRL: micro-batches per optimizer step")
    parser.add_argument("--trl-packed", action="store_true", help="also one TRL run with packing=True")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a jobs/sft.py override for rayalign's side, e.g. data.packing=false (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, MLflow store)")
    parser.add_argument("--trl-worker", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--packed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if args.trl_worker:
        trl_worker(args, Path(args.data), Path(args.trl_worker))
        return
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")

    import trl

    workdir = Path(tempfile.mkdtemp(prefix="sft_vs_trl-"))
    load = {"start": os.getloadavg()[0]}  # 1-minute load average: other work on the machine skews both sides
    repeats: list[dict[str, dict]] = []
    packed = None
    try:
        data = workdir / "rows.jsonl"
        write_rows(args.examples, data)
        for r in range(args.repeats):
            run_dir = workdir / f"repeat{r}"
            run_dir.mkdir()
            repeats.append({"rayalign": bench_rayalign(args, data, run_dir)})
            repeats[-1]["trl"] = bench_trl(args, data, run_dir, packed=False)
            load[f"after_repeat{r}"] = os.getloadavg()[0]
        if args.trl_packed:
            packed = bench_trl(args, data, workdir, packed=True)
    finally:
        if args.keep:
            print(f"kept {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    def summarise(label: str, res: dict, ours: int) -> None:
        res["tokens_per_second"] = res["tokens"] / res["seconds"]
        print(f"{label}: {res['tokens']} tokens in {res['seconds']:.1f} s over {len(res['steps_seconds'])} steps = "
              f"{res['tokens_per_second']:.0f} tokens/s", flush=True)
        if abs(res["tokens"] - ours) > 0.02 * ours:
            raise SystemExit(f"{label} tokenized {res['tokens']} tokens, rayalign {ours}: not the same work")

    for r, pair in enumerate(repeats):
        for name, res in pair.items():
            summarise(f"repeat {r} {name}", res, pair["rayalign"]["tokens"])
    if packed:
        summarise("trl_packed", packed, repeats[0]["rayalign"]["tokens"])
    per_repeat = [p["rayalign"]["tokens_per_second"] / p["trl"]["tokens_per_second"] for p in repeats]
    ours_median = statistics.median(p["rayalign"]["tokens_per_second"] for p in repeats)
    ratios = {"tokens_per_s_vs_trl": statistics.median(per_repeat)}
    if packed:
        ratios["tokens_per_s_vs_trl_packed"] = ours_median / packed["tokens_per_second"]
    print("rayalign / TRL tokens/s: median %.3f over %d repeats (each: %s; target >= 1.3)"
          % (ratios["tokens_per_s_vs_trl"], len(per_repeat), ", ".join(f"{x:.3f}" for x in per_repeat)), flush=True)
    r3 = lambda x: round(x, 3) if isinstance(x, float) else x  # noqa: E731
    shown = lambda res: {k: ([r3(x) for x in v] if isinstance(v, list) else r3(v)) for k, v in res.items()}  # noqa: E731
    print(json.dumps({
        "benchmark": "sft_vs_trl",
        "config": {"model": args.model, "rayalign_overrides": args.override, "examples": args.examples,
                   "repeats": args.repeats, "rayalign_rows_per_step": args.rows, "trl_micro_batch": args.micro,
                   "trl_accumulation": args.accumulation, "max_length": MAX_LENGTH, "lora_rank": LORA_RANK,
                   "lora_alpha": LORA_ALPHA, "lr": LR, "dtype": "float32", "trl_version": trl.__version__,
                   "cpu_count": os.cpu_count(), "load_average_1m": {k: round(v, 2) for k, v in load.items()}},
        "repeats": [{name: shown(res) for name, res in pair.items()} for pair in repeats],
        **({"trl_packed": shown(packed)} if packed else {}),
        "tokens_per_s_vs_trl_per_repeat": [round(x, 3) for x in per_repeat],
        "tokens_per_s_vs_trl_spread": [round(min(per_repeat), 3), round(max(per_repeat), 3)],
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
    }))


if __name__ == "__main__":
    main()
