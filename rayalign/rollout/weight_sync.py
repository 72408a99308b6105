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
paths and manifests cross it. Each bucket records the Ray node that wrote it; an engine on another node first
copies the buckets it cannot see through the object store (a task on the writer's node reads each file) into
its own /dev/shm, loads them, and deletes the copies. On clusters, `rayalign.rollout.broadcast` sends full weights
by a collective broadcast instead (NCCL on GPU, gloo on CPU): the version is then only a marker in the store.

A file's name starts with the pid (and pid namespace) of the process that wrote it, ``rayalign-<ns>-<pid>-...``: a
job that is killed cannot delete its files, so a new `WeightStore`, engine or learner node deletes, on its node,
those whose writer is gone (`sweep_stale_files`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

SHM_DIR = Path(os.environ.get("RAYALIGN_SHM_DIR", "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()))
DEFAULT_BUCKET_BYTES = 256 * 1024**2
_OWNED = re.compile(r"rayalign-(\d+)-(\d+)-")

log = logging.getLogger("rayalign.weights")


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
    except OSError:
        return "0"  # unknown: files named so are never swept


def shm_file(suffix: str) -> Path:
    """A new shared-memory file path named after this process (see `sweep_stale_files`)."""
    return SHM_DIR / f"rayalign-{_pid_namespace()}-{os.getpid()}-{suffix}"


def sweep_stale_files(directory: Path | None = None) -> tuple[int, int]:
    """Delete the bucket files in ``directory`` (default: the shared-memory dir) whose writing process is gone --
    left by a job or engine that was killed. Only files written from this pid namespace are judged (another
    container sharing /dev/shm has its own pids). Returns (files, bytes) removed."""
    ns = _pid_namespace()
    removed = freed = 0
    for path in (directory or SHM_DIR).glob("rayalign-*"):
        match = _OWNED.match(path.name)
        if match is None or match[1] != ns or ns == "0" or _alive(int(match[2])):
            continue
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError as e:  # gone meanwhile, another user's (sticky /dev/shm), a directory: never fail the caller
            log.debug("left %s: %s", path, e)
            continue
        removed, freed = removed + 1, freed + size
    if removed:
        log.warning("removed %d stale weight file(s) (%.1f MB) in %s left by processes that are gone",
                    removed, freed / 1e6, directory or SHM_DIR)
    return removed, freed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


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
    node_id: str | None = None
    """Ray node whose /dev/shm holds ``path`` (None: written outside Ray, read on the same machine)."""


def current_node() -> str | None:
    """This process's Ray node id (None outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


@dataclasses.dataclass(frozen=True)
class Published:
    """One published policy version. ``kind``: "base" (v0, the weights on disk), "lora", "full" or "broadcast"
    (pushed to the engines by `RolloutGroup.push`: a marker, with no payload to pull)."""

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
        sweep_stale_files()

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
    """Delete a version's bucket files, on whichever node wrote them (the store may live on another)."""
    here = current_node()
    elsewhere: dict[str, list[str]] = {}
    for bucket in published.buckets:
        if bucket.node_id in (None, here):
            remove_files([bucket.path])
        else:
            elsewhere.setdefault(bucket.node_id, []).append(bucket.path)
    if elsewhere:
        from rayalign.resources import on_node

        for node_id, paths in elsewhere.items():
            on_node(remove_files, node_id).remote(paths)  # not awaited: nothing waits on the old version's files


def remove_files(paths: list[str]) -> None:
    """Delete ``paths`` that exist (on this node)."""
    for path in paths:
        try:
            os.unlink(path)
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


def bucketed(named_tensors: Iterable[tuple[str, Any]], bucket_bytes: int, dtype: Any = None,
             device: Any = None) -> Iterator[tuple[list[tuple[str, Any]], int]]:
    """Group ``(name, tensor)`` pairs into buckets of at most ``bucket_bytes`` (a larger tensor gets its own):
    yields (pairs, total bytes). ``dtype`` and ``device`` convert on the way (a bucket waits on that device)."""
    pending: list[tuple[str, Any]] = []
    size = 0
    for name, tensor in named_tensors:
        t = tensor.detach()
        if dtype is not None:
            t = t.to(dtype)
        t = t.contiguous() if device is None else t.to(device).contiguous()
        n = t.numel() * t.element_size()
        if pending and size + n > bucket_bytes:
            yield pending, size
            pending, size = [], 0
        pending.append((name, t))
        size += n
    if pending:
        yield pending, size


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
    return Published(version=version, kind="full", buckets=tuple(buckets))


def pack(tensors: list[tuple[str, Any]], data: Any) -> tuple[TensorEntry, ...]:
    """Copy ``tensors`` one after another into the flat uint8 tensor ``data``; returns where each went."""
    import torch

    entries, offset = [], 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        data[offset:offset + n].copy_(t.reshape(-1).view(torch.uint8))
        entries.append(TensorEntry(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, n))
        offset += n
    return tuple(entries)


def unpack(data: Any, entries: Iterable[Any]) -> Iterator[tuple[str, Any]]:
    """The ``(name, tensor)`` views of a flat uint8 tensor that `pack` filled (entries as TensorEntry or lists)."""
    import torch

    for name, dtype, shape, offset, n in entries:
        yield name, data[offset:offset + n].view(getattr(torch, dtype)).view(tuple(shape))


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


def local_buckets(buckets: tuple[Bucket, ...], in_flight: int = 2) -> tuple[list[Bucket], list[str]]:
    """``buckets`` as files this node can read: those written here as they are; the others copied from their node
    through the object store into this node's shared memory, ``in_flight`` buckets at a time (one arrives while
    the last is written, and the object store holds at most that many). Returns the buckets and the copies'
    paths, which the caller deletes once the weights are loaded."""
    here = current_node()
    remote = iter([b for b in buckets if b.node_id not in (None, here)])
    import ray

    from rayalign.resources import on_node

    reads: dict[str, Any] = {}

    def read_next() -> None:
        bucket = next(remote, None)
        if bucket is not None:
            reads[bucket.path] = on_node(_read_file, bucket.node_id).remote(bucket.path, bucket.nbytes)

    for _ in range(in_flight):
        read_next()
    out, copies = [], []
    try:
        for bucket in buckets:
            if bucket.path in reads:
                copy = shm_file(f"copy-{uuid.uuid4().hex[:8]}-{Path(bucket.path).name}")
                copies.append(str(copy))
                data = ray.get(reads.pop(bucket.path))  # a zero-copy view of the object store
                read_next()
                data.tofile(copy)
                del data
                bucket = dataclasses.replace(bucket, path=str(copy), node_id=here)
            out.append(bucket)
    except BaseException:
        remove_files(copies)
        raise
    return out, copies


def _read_file(path: str, nbytes: int) -> Any:
    import numpy as np

    data = np.fromfile(path, dtype=np.uint8)
    if data.size != nbytes:
        raise RuntimeError(f"{path}: expected {nbytes} bytes, found {data.size} (a newer version replaced it?)")
    return data


class WorkerExtension:
    """Mixed into each vLLM worker (``worker_extension_cls``): loads published buckets, or a version broadcast to
    its weight group, into the model in place."""

    def rayalign_load_buckets(self, buckets: list) -> int:
        """``buckets``: ``[[path, nbytes, [[name, dtype, shape, offset, nbytes], ...]], ...]`` (plain lists: they
        cross vLLM's RPC). Tensors are views of the mapped files; vLLM's in-place reload copies them into the
        model and redoes the per-layer processing that the CPU and quantized kernels need (a plain
        ``load_weights`` fails on already-processed layers)."""
        import torch

        count = 0

        def tensors():
            nonlocal count
            for path, nbytes, entries in buckets:
                data = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
                for pair in unpack(data, entries):
                    count += 1
                    yield pair

        self._rayalign_reload(tensors())
        return count

    def rayalign_join_group(self, host: str, port: int, first_rank: int, world_size: int, backend: str) -> None:
        """Join a broadcast weight group (`rayalign.rollout.broadcast`) as rank ``first_rank`` + this worker's
        rank in its engine; a group joined before is dropped."""
        from rayalign.rollout.broadcast import open_group

        self._rayalign_group = None
        group = open_group(host, port, first_rank + self.rank, world_size, backend)  # type: ignore[attr-defined]
        self._rayalign_group = (group, backend)

    def rayalign_receive(self) -> int:
        """Receive one broadcast version into the model in place; returns the bytes received."""
        from rayalign.rollout.broadcast import receive

        group = getattr(self, "_rayalign_group", None)
        if group is None:
            raise RuntimeError("this worker has joined no weight group")
        received = 0
        stream = receive(*group)

        def tensors():
            nonlocal received
            for name, t in stream:
                received += t.numel() * t.element_size()
                yield name, t

        try:
            self._rayalign_reload(tensors())
        finally:
            for _ in stream:  # the sender waits on every member: take the rest even if loading failed
                pass
        return received

    def _rayalign_reload(self, weights: Iterator[tuple[str, Any]]) -> None:
        from vllm.model_executor.model_loader.reload.inplace import reload_weights

        runner = self.model_runner  # type: ignore[attr-defined]
        reload_weights(self.vllm_config, runner.get_model(), weights_iterator=weights,  # type: ignore[attr-defined]
                       weights_path=None, is_checkpoint_format=True)
