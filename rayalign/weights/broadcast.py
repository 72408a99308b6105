"""Full weights by collective broadcast: learner rank 0 sends, every engine worker receives.

The transport for clusters: one broadcast reaches every engine on every node at the interconnect's speed, with no
files and no object store. The group is its own torch process group (a TCPStore on the sender plus
`ProcessGroupNCCL` on GPU or `ProcessGroupGloo` on CPU), apart from Ray Train's and vLLM's own groups; its ranks
are the sender (0) and then every vLLM worker of every engine (1, 2, ...).

A version goes out as buckets, each as three broadcasts: its sizes, a JSON header naming its tensors
(name, dtype, shape, offset, bytes) and its bytes; sizes (0, 0) end the version and (-1, 0) abort it (the sender
failed midway: receivers raise rather than wait). Receivers therefore need no manifest in advance, and the sender
can stream weights that exist only one layer at a time (ZeRO-3 gathers). Each bucket is one buffer on the
members' device (a tensor larger than a bucket gets its own), outside vLLM's `gpu_memory_utilization` budget.

Across nodes gloo finds its interface from the host name; where that resolves to a loopback address, set
``GLOO_SOCKET_IFNAME`` (and ``NCCL_SOCKET_IFNAME`` for NCCL's bootstrap) on every node.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any, Callable, Iterable, Iterator

from rayalign.weights.buckets import DEFAULT_BUCKET_BYTES, bucketed, pack, unpack

TIMEOUT_S = 300
"""How long a member waits in one collective (or for the others to join) before failing. Under NCCL a timeout
also ends the process (the watchdog's default): an engine whose sender died is then restarted by Ray."""


def serve_store() -> Any:
    """The group's meeting point, served by rank 0 on this node (a port the OS picks, held from here on)."""
    import ray
    import torch.distributed as dist

    host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    return dist.TCPStore(host, 0, None, True, datetime.timedelta(seconds=TIMEOUT_S), wait_for_workers=False)


def open_group(host: str, port: int, rank: int, world_size: int, backend: str, store: Any = None) -> Any:
    """Join the weight group: every member calls this at once (rank 0 with the `serve_store` it handed out), and
    it returns once all are connected."""
    import torch
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    if store is None:
        store = dist.TCPStore(host, port, None, False, timeout)
    store = dist.PrefixStore("rayalign-weights", store)
    if backend == "gloo":
        group = dist.ProcessGroupGloo(store, rank, world_size, timeout)
    elif backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        group = dist.ProcessGroupNCCL(store, rank, world_size, options)
    else:
        raise ValueError(f"weight group backend must be 'gloo' or 'nccl', not {backend!r}")
    _broadcast(group, torch.zeros(1, device=_device(backend)))  # everyone is there (NCCL connects lazily: now)
    return group


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
    try:
        for tensors, size in bucketed(named_tensors, bucket_bytes, dtype, device):
            data = torch.empty(size, dtype=torch.uint8, device=device)
            entries = [dataclasses.astuple(e) for e in pack(tensors, data)]
            header = torch.frombuffer(bytearray(json.dumps(entries).encode()), dtype=torch.uint8).to(device)
            _broadcast(group, torch.tensor([header.numel(), size], dtype=torch.int64, device=device))
            _broadcast(group, header)
            _broadcast(group, data)
            sent += size
    except BaseException:
        try:  # tell the receivers, so that they fail now rather than at the timeout
            _broadcast(group, torch.tensor([-1, 0], dtype=torch.int64, device=device))
        except Exception:
            pass  # the group itself broke (a member died): its members fail on their own
        raise
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
        if header_bytes == 0:
            return
        if header_bytes < 0:
            raise RuntimeError("the sender stopped this version midway (its own error says why)")
        header = torch.empty(header_bytes, dtype=torch.uint8, device=device)
        _broadcast(group, header)
        data = torch.empty(size, dtype=torch.uint8, device=device)
        _broadcast(group, data)
        yield from unpack(data, json.loads(bytes(header.cpu().numpy())))


class ProcessSender:
    """This process as the sender of a weight group (a `rayalign.weights.WeightSender`), broadcasting what
    ``weights()`` yields at each send: for drivers that hold the weights themselves, tests and benchmarks. (The
    learner's sender is `rayalign.learner.group.BroadcastSender`.)"""

    def __init__(self, weights: Callable[[], Iterable[tuple[str, Any]]], *, backend: str = "gloo",
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: Any = None):
        self.weights, self.backend, self.bucket_bytes, self.dtype = weights, backend, bucket_bytes, dtype
        self.store: Any = None
        self.group: Any = None
        self.sends = 0

    def address(self) -> tuple[str, int, str]:
        self.store = serve_store()
        return self.store.host, self.store.port, self.backend

    def join(self, host: str, port: int, world_size: int, backend: str) -> None:
        self.group = None
        self.group = open_group(host, port, 0, world_size, backend, store=self.store)

    def send(self, version: int) -> int:
        self.sends += 1
        return send(self.group, self.backend, self.weights(), bucket_bytes=self.bucket_bytes, dtype=self.dtype)
