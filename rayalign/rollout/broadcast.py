"""Full weights by collective broadcast: learner rank 0 sends, every engine worker receives.

The transport for clusters: one broadcast reaches every engine on every node at the interconnect's speed, with no
files and no object store. The group is its own torch process group (a TCPStore on the sender plus
`ProcessGroupNCCL` on GPU or `ProcessGroupGloo` on CPU), apart from Ray Train's and vLLM's own groups; its ranks
are the sender (0) and then every vLLM worker of every engine (1, 2, ...).

A version goes out as buckets, each as three broadcasts: its sizes, a JSON header naming its tensors
(name, dtype, shape, offset, bytes) and its bytes; a zero-size bucket ends the version. Receivers therefore need
no manifest in advance, and the sender can stream weights that exist only one layer at a time (ZeRO-3 gathers).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import socket
from typing import Any, Callable, Iterable, Iterator

from rayalign.rollout.weight_sync import DEFAULT_BUCKET_BYTES, bucketed, pack, unpack

TIMEOUT_S = 1800
"""How long a member waits in one collective before failing (a sender that died leaves receivers waiting)."""


def group_address() -> tuple[str, int]:
    """This node's address and a free port, for a group whose rank 0 (the TCPStore server) runs here."""
    import ray

    host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    with socket.socket() as s:
        s.bind((host, 0))
        return host, s.getsockname()[1]


def open_group(host: str, port: int, rank: int, world_size: int, backend: str) -> Any:
    """Join the weight group (every member calls this at once; it returns when all have)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, wait_for_workers=False, timeout=timeout)
    store = dist.PrefixStore("rayalign-weights", store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    raise ValueError(f"weight group backend must be 'gloo' or 'nccl', not {backend!r}")


def _device(backend: str) -> Any:
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _broadcast(group: Any, tensor: Any) -> None:
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


def send(group: Any, backend: str, named_tensors: Iterable[tuple[str, Any]], *,
         bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: Any = None) -> int:
    """Rank 0: broadcast ``(name, tensor)`` pairs bucket by bucket (``dtype`` converts on the way). Returns bytes."""
    import torch

    device, sent = _device(backend), 0
    for tensors, size in bucketed(named_tensors, bucket_bytes, dtype):
        data = torch.empty(size, dtype=torch.uint8, device=device)
        entries = [dataclasses.astuple(e) for e in pack(tensors, data)]
        header = torch.frombuffer(bytearray(json.dumps(entries).encode()), dtype=torch.uint8).to(device)
        _broadcast(group, torch.tensor([header.numel(), size], dtype=torch.int64, device=device))
        _broadcast(group, header)
        _broadcast(group, data)
        sent += size
    _broadcast(group, torch.zeros(2, dtype=torch.int64, device=device))  # the end of this version
    return sent


def receive(group: Any, backend: str) -> Iterator[tuple[str, Any]]:
    """Ranks > 0: the ``(name, tensor)`` pairs of one version as they arrive. Tensors are views of a fresh buffer
    per bucket, so they stay valid after the next bucket arrives. Run it to its end: the sender waits on every
    member in every broadcast."""
    import torch

    device = _device(backend)
    while True:
        sizes = torch.empty(2, dtype=torch.int64, device=device)
        _broadcast(group, sizes)
        header_bytes, size = sizes.tolist()
        if size == 0:
            return
        header = torch.empty(header_bytes, dtype=torch.uint8, device=device)
        _broadcast(group, header)
        data = torch.empty(size, dtype=torch.uint8, device=device)
        _broadcast(group, data)
        yield from unpack(data, json.loads(bytes(header.cpu().numpy())))


class ProcessSender:
    """This process as the sender of a weight group (a `rayalign.rollout.group.WeightSender`), broadcasting what
    ``weights()`` yields at each send: for drivers that hold the weights themselves, tests and benchmarks. (The
    learner's sender is `rayalign.learner.group.BroadcastSender`.)"""

    def __init__(self, weights: Callable[[], Iterable[tuple[str, Any]]], *, backend: str = "gloo",
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: Any = None):
        self.weights, self.backend, self.bucket_bytes, self.dtype = weights, backend, bucket_bytes, dtype
        self.group: Any = None
        self.sends = 0

    def address(self) -> tuple[str, int, str]:
        return (*group_address(), self.backend)

    def join(self, host: str, port: int, world_size: int, backend: str) -> None:
        self.group = None
        self.group = open_group(host, port, 0, world_size, backend)

    def send(self, version: int) -> int:
        self.sends += 1
        return send(self.group, self.backend, self.weights(), bucket_bytes=self.bucket_bytes, dtype=self.dtype)
