"""Learner -> rollout-engine weight sync.

Design (pull by version, pushed by the driver):
  1. The learner *publishes* version ``v`` to a small named `WeightStore` actor: a LoRA adapter (its files, a few
     MB, kept in the store so any node can fetch them) or full weights (written once into shared-memory buckets).
  2. The driver calls ``RolloutGroup.sync()``: every engine pulls ``v`` from the store and applies it (LoRA: a new
     `LoRARequest`, the old adapter dropped; full: one RPC per engine that streams every bucket into its vLLM workers,
     then the prefix cache is reset). When ``sync()`` returns, every engine generates with ``v`` only.
  3. An engine that Ray restarts (or that autoscaling adds) pulls the latest version in its constructor, before
     it takes work; every generate call also names the version it expects, and an engine that is behind pulls first.

Full weights travel through files in /dev/shm that vLLM's worker processes map without a copy
(`torch.from_file(shared=True)`): vLLM's ``collective_rpc`` turns tensors in its arguments into lists, so only
paths and manifests cross it. This covers engines on the learner's node (the CPU default). Engines on other nodes
and the NCCL broadcast for GPU clusters are not implemented yet.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable

SHM_DIR = Path(os.environ.get("RAYALIGN_SHM_DIR", "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()))
DEFAULT_BUCKET_BYTES = 256 * 1024**2


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor sits inside a bucket file."""

    name: str
    dtype: str  # e.g. "float32", "bfloat16"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class Bucket:
    path: str
    nbytes: int
    entries: tuple[TensorEntry, ...]


@dataclasses.dataclass(frozen=True)
class Published:
    """One published policy version. ``kind``: "base" (v0, the weights on disk), "lora" or "full"."""

    version: int
    kind: str
    lora_files: dict[str, bytes] | None = None
    buckets: tuple[Bucket, ...] = ()

    @property
    def nbytes(self) -> int:
        if self.lora_files:
            return sum(len(b) for b in self.lora_files.values())
        return sum(b.nbytes for b in self.buckets)


class WeightStore:
    """Named Ray actor holding the latest published version (and owning its shared-memory files)."""

    def __init__(self) -> None:
        self._latest = Published(version=0, kind="base")

    def publish(self, published: Published) -> int:
        if published.version <= self._latest.version:
            raise ValueError(f"version {published.version} is not newer than {self._latest.version}")
        old, self._latest = self._latest, published
        _remove_buckets(old)
        return published.version

    def latest(self) -> Published:
        return self._latest

    def latest_version(self) -> int:
        return self._latest.version

    def close(self) -> None:
        _remove_buckets(self._latest)


def _remove_buckets(published: Published) -> None:
    for bucket in published.buckets:
        try:
            os.unlink(bucket.path)
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------------------------------------------------------
# Learner side
# ---------------------------------------------------------------------------------------------------------------


def lora_payload(version: int, adapter_dir: str | Path) -> Published:
    """A peft adapter directory (adapter_config.json + adapter_model.safetensors) as a publishable version."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a peft adapter directory (no adapter_config.json)")
    files = {p.name: p.read_bytes() for p in adapter_dir.iterdir() if p.is_file()}
    return Published(version=version, kind="lora", lora_files=files)


def full_payload(version: int, named_tensors: Iterable[tuple[str, Any]], *,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: Any = None) -> Published:
    """Write ``(name, tensor)`` pairs into shared-memory bucket files (one copy each), ready to publish.

    ``dtype`` converts on the way (publish in the engines' dtype to halve the bytes for bf16 engines).
    """
    import torch

    run = uuid.uuid4().hex[:12]
    buckets: list[Bucket] = []
    pending: list[tuple[str, torch.Tensor]] = []
    size = 0

    def flush() -> None:
        nonlocal pending, size
        if not pending:
            return
        path = SHM_DIR / f"rayalign-{run}-v{version}-b{len(buckets)}"
        data = torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)
        entries, offset = [], 0
        for name, t in pending:
            n = t.numel() * t.element_size()
            data[offset:offset + n].copy_(t.reshape(-1).view(torch.uint8))
            entries.append(TensorEntry(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, n))
            offset += n
        buckets.append(Bucket(str(path), size, tuple(entries)))
        pending, size = [], 0

    for name, tensor in named_tensors:
        t = tensor.detach()
        if dtype is not None:
            t = t.to(dtype)
        t = t.contiguous().cpu()
        n = t.numel() * t.element_size()
        if pending and size + n > bucket_bytes:
            flush()
        pending.append((name, t))
        size += n
    flush()
    return Published(version=version, kind="full", buckets=tuple(buckets))


# ---------------------------------------------------------------------------------------------------------------
# Engine side
# ---------------------------------------------------------------------------------------------------------------


def write_lora_files(published: Published, root: Path) -> Path:
    """Materialise a published adapter on this node; returns its directory."""
    assert published.lora_files is not None
    path = root / f"v{published.version}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    for name, data in published.lora_files.items():
        (path / name).write_bytes(data)
    return path


class WorkerExtension:
    """Mixed into each vLLM worker (``worker_extension_cls``): loads published buckets into the model in place."""

    def rayalign_load_buckets(self, buckets: list) -> int:
        """``buckets``: ``[[path, nbytes, [[name, dtype, shape, offset, nbytes], ...]], ...]`` (plain lists: they
        cross vLLM's RPC). Tensors are views of the mapped files; vLLM's in-place reload copies them into the
        model and redoes the per-layer processing that the CPU and quantized kernels need (a plain
        ``load_weights`` fails on already-processed layers)."""
        import torch
        from vllm.model_executor.model_loader.reload.inplace import reload_weights

        count = 0

        def tensors():
            nonlocal count
            for path, nbytes, entries in buckets:
                data = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
                for name, dtype, shape, offset, n in entries:
                    count += 1
                    yield name, data[offset:offset + n].view(getattr(torch, dtype)).view(shape)

        runner = self.model_runner  # type: ignore[attr-defined]
        reload_weights(self.vllm_config, runner.get_model(), weights_iterator=tensors(),  # type: ignore[attr-defined]
                       weights_path=None, is_checkpoint_format=True)
        return count
