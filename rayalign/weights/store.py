"""The versioned store: what the learner published last, as a payload any engine (or a restarted one) can pull."""

from __future__ import annotations

import dataclasses
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Literal

from rayalign.weights.buckets import DEFAULT_BUCKET_BYTES, Bucket, bucketed, pack
from rayalign.weights.shm import current_node, remove_buckets, shm_file, sweep_stale_files


@dataclasses.dataclass(frozen=True)
class Published:
    """One published policy version.

    ``format``: "base" (v0, the weights on disk), "adapter" (``adapter_files``) or "full" (``buckets``, or nothing
    when the version went by ``route`` "broadcast": a marker telling restarted engines to wait for a push).
    """

    version: int
    format: Literal["base", "adapter", "full"]
    route: Literal["store", "broadcast"] = "store"
    adapter_files: dict[str, bytes] | None = None
    buckets: tuple[Bucket, ...] = ()

    @property
    def nbytes(self) -> int:
        if self.adapter_files:
            return sum(len(b) for b in self.adapter_files.values())
        return sum(b.nbytes for b in self.buckets)


class WeightStore:
    """Named Ray actor holding the latest published version (and owning its shared-memory files)."""

    def __init__(self) -> None:
        self._latest = Published(version=0, format="base")
        sweep_stale_files()

    def publish(self, published: Published) -> int:
        if published.version <= self._latest.version:
            raise ValueError(f"version {published.version} is not newer than {self._latest.version}")
        old, self._latest = self._latest, published
        remove_buckets(old.buckets)
        return published.version

    def latest(self) -> Published:
        return self._latest

    def latest_version(self) -> int:
        return self._latest.version

    def close(self) -> None:
        remove_buckets(self._latest.buckets)


def broadcast_marker(version: int) -> Published:
    """The store's record of a version pushed by broadcast (nothing to pull)."""
    return Published(version=version, format="full", route="broadcast")


def adapter_payload(version: int, adapter_dir: str | Path) -> Published:
    """A peft adapter directory (adapter_config.json + adapter_model.safetensors) as a publishable version."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a peft adapter directory (no adapter_config.json)")
    files = {p.name: p.read_bytes() for p in adapter_dir.iterdir() if p.is_file()}
    return Published(version=version, format="adapter", adapter_files=files)


def full_payload(version: int, named_tensors: Iterable[tuple[str, Any]], *,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: Any = None) -> Published:
    """Write ``(name, tensor)`` pairs into shared-memory bucket files (one copy each), ready to publish.

    ``dtype`` converts on the way (publish in the engines' dtype to halve the bytes for bf16 engines).
    """
    import torch

    run = uuid.uuid4().hex[:8]
    node_id = current_node()
    buckets: list[Bucket] = []
    for tensors, size in bucketed(named_tensors, bucket_bytes, dtype, "cpu"):
        path = shm_file(f"{run}-v{version}-b{len(buckets)}")
        data = torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)
        buckets.append(Bucket(str(path), size, pack(tensors, data), node_id))
    return Published(version=version, format="full", buckets=tuple(buckets))


def write_adapter_files(published: Published, root: Path) -> Path:
    """Materialise a published adapter on this node; returns its directory."""
    if published.adapter_files is None:
        raise ValueError(f"version {published.version} is not an adapter ({published.format})")
    path = root / f"v{published.version}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    for name, data in published.adapter_files.items():
        (path / name).write_bytes(data)
    return path
