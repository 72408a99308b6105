"""`import rayalign` (and its light modules) must not pull in the heavy engines."""

import subprocess
import sys

HEAVY = ("vllm", "deepspeed", "ray", "mlflow", "torch", "transformers")


def test_import_rayalign_is_light():
    code = (
        "import sys, rayalign, rayalign.config, rayalign.models, rayalign.tracking, rayalign.types, "
        "rayalign.resources, rayalign.data.prompts, rayalign.rollout.engine, rayalign.rollout.group, rayalign.job, "
        "rayalign.weights, rayalign.weights.store, rayalign.weights.broadcast, rayalign.weights.extension\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import rayalign pulled in: {out}"


def test_environment_imports_transformers_models():
    # The CPU vLLM build drags in torchvision/torchaudio/torchcodec, which break this import; setup removes them.
    subprocess.run([sys.executable, "-c", "from transformers import LlamaConfig, LlamaForCausalLM"], check=True)
