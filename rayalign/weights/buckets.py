"""Many tensors in one flat byte buffer (a bucket): packing, unpacking, and grouping a stream into buckets.

Buckets keep weight sync to a few large transfers instead of one per parameter. A bucket's layout is a tuple of
`TensorEntry` (name, dtype, shape, byte offset, byte size), small enough to cross vLLM's RPC as plain lists.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator

DEFAULT_BUCKET_BYTES = 256 * 1024**2


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor sits inside a bucket."""

    name: str
    dtype: str  # e.g. "float32", "bfloat16"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class Bucket:
    """A bucket written to a shared-memory file."""

    path: str
    nbytes: int
    entries: tuple[TensorEntry, ...]
    node_id: str | None = None
    """Ray node whose /dev/shm holds ``path`` (None: written outside Ray, read on the same machine)."""

    def as_lists(self) -> list:
        """``[path, nbytes, [[name, dtype, shape, offset, nbytes], ...]]``: what crosses vLLM's RPC."""
        return [self.path, self.nbytes, [[e.name, e.dtype, list(e.shape), e.offset, e.nbytes] for e in self.entries]]


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
