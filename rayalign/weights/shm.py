"""Shared-memory weight files: naming, reading them from another node, and sweeping those left by killed jobs.

Full weights travel through files in /dev/shm that vLLM's worker processes map without a copy
(`torch.from_file(shared=True)`): vLLM's ``collective_rpc`` turns tensors in its arguments into lists, so only
paths and manifests cross it. Each bucket records the Ray node that wrote it; an engine on another node first
copies the buckets it cannot see through the object store (a task on the writer's node reads each file) into its
own /dev/shm, loads them, and deletes the copies.

A file's name starts with the pid (and pid namespace) of the process that wrote it, ``rayalign-<ns>-<pid>-...``: a
job that is killed cannot delete its files, so a new `WeightStore`, engine or learner node deletes, on its node,
those whose writer is gone (`sweep_stale_files`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any

from rayalign.weights.buckets import Bucket

SHM_DIR = Path(os.environ.get("RAYALIGN_SHM_DIR", "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()))
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


def current_node() -> str | None:
    """This process's Ray node id (None outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def remove_files(paths: list[str]) -> None:
    """Delete ``paths`` that exist (on this node)."""
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def remove_buckets(buckets: tuple[Bucket, ...]) -> None:
    """Delete bucket files on whichever node wrote them (the caller may live on another)."""
    here = current_node()
    elsewhere: dict[str, list[str]] = {}
    for bucket in buckets:
        if bucket.node_id in (None, here):
            remove_files([bucket.path])
        else:
            elsewhere.setdefault(bucket.node_id, []).append(bucket.path)
    if elsewhere:
        from rayalign.resources import on_node

        for node_id, paths in elsewhere.items():
            on_node(remove_files, node_id).remote(paths)  # not awaited: nothing waits on an old version's files


def local_buckets(buckets: tuple[Bucket, ...], in_flight: int = 2) -> tuple[list[Bucket], list[str]]:
    """``buckets`` as files this node can read: those written here as they are; the others copied from their node
    through the object store into this node's shared memory, ``in_flight`` buckets at a time (one arrives while
    the last is written, and the object store holds at most that many). Returns the buckets and the copies'
    paths, which the caller deletes once the weights are loaded."""
    import ray

    from rayalign.resources import on_node

    here = current_node()
    remote = iter([b for b in buckets if b.node_id not in (None, here)])
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
