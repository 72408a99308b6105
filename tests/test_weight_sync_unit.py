"""Weight-sync control flow without engines: buckets round-trip, store versions, LoRA payloads."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import read_buckets
from rayalign.weights.store import Published, WeightStore, adapter_payload, full_payload, write_adapter_files


def test_buckets_round_trip_in_few_calls():
    tensors = [(f"layer{i}.weight", torch.randn(64, 33)) for i in range(10)] + [("bf", torch.randn(7).bfloat16())]
    published = full_payload(1, tensors, bucket_bytes=64 * 33 * 4 * 3)
    try:
        assert len(published.buckets) == 4  # 3 + 3 + 3 + (1 + bf16 vector)
        loaded = read_buckets(published)
        assert set(loaded) == {n for n, _ in tensors}
        for name, t in tensors:
            assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
    finally:
        store = WeightStore()  # the store owns the files from here on: a newer version removes them
        store.publish(published)
        store.publish(Published(version=2, format="adapter", adapter_files={"a": b"x"}))
        assert not any(os.path.exists(b.path) for b in published.buckets)


def test_store_versions_only_move_forward():
    store = WeightStore()
    assert store.latest().version == 0 and store.latest().format == "base"
    store.publish(Published(version=1, format="adapter", adapter_files={"adapter_config.json": b"{}"}))
    with pytest.raises(ValueError, match="not newer"):
        store.publish(Published(version=1, format="adapter", adapter_files={}))
    assert store.latest_version() == 1


def test_adapter_payload(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a peft adapter directory"):
        adapter_payload(1, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"123")
    published = adapter_payload(3, tmp_path)
    assert published.nbytes == 5
    out = write_adapter_files(published, tmp_path / "engine")
    assert (out / "adapter_model.safetensors").read_bytes() == b"123" and out.name == "v3"


def test_cpu_cores_are_split_between_engines():
    from rayalign.resources import cpu_cores_for_engine

    assert cpu_cores_for_engine(0, 1, [0, 1]) == "0,1"
    assert [cpu_cores_for_engine(i, 2, [0, 1, 2, 3]) for i in range(2)] == ["0,1", "2,3"]
    assert [cpu_cores_for_engine(i, 3, [4, 5]) for i in range(3)] == ["4", "5", "4"]


def test_sweep_removes_only_files_whose_writer_is_gone(tmp_path):
    import subprocess
    import sys

    from rayalign.weights.shm import _pid_namespace, shm_file, sweep_stale_files

    ns = _pid_namespace()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    files = {
        "dead": tmp_path / f"rayalign-{ns}-{dead}-ab12-v3-b0",
        "dead copy": tmp_path / f"rayalign-{ns}-{dead}-copy-cd34-rayalign-{ns}-1-ab12-v3-b1",
        "ours": tmp_path / shm_file("ef56-v1-b0").name,
        "other namespace": tmp_path / f"rayalign-1{ns}-{dead}-ab12-v1-b0",
        "unowned": tmp_path / "rayalign-0123456789ab-v2-b0",
    }
    for path in files.values():
        path.write_bytes(b"x" * 10)
    assert sweep_stale_files(tmp_path) == (2, 20)
    assert {k for k, p in files.items() if p.exists()} == {"ours", "other namespace", "unowned"}
    assert sweep_stale_files(tmp_path) == (0, 0)


def test_broadcast_round_trip_and_an_aborted_version():
    """Two members of a gloo weight group in two threads: a version arrives whole, in buckets; a sender that fails
    midway makes the receiver raise instead of waiting."""
    import threading

    from rayalign.weights import broadcast

    tensors = [(f"layer{i}.weight", torch.randn(64, 33)) for i in range(5)] + [("bf", torch.randn(7).bfloat16())]
    store = broadcast.serve_store()
    got, seen_before_abort, errors = {}, [], []

    def receiver():
        group = broadcast.open_group(store.host, store.port, 1, 2, "gloo")
        got.update((name, t.clone()) for name, t in broadcast.receive(group, "gloo"))
        try:
            for name, _ in broadcast.receive(group, "gloo"):
                seen_before_abort.append(name)
        except RuntimeError as e:
            errors.append(str(e))

    thread = threading.Thread(target=receiver, daemon=True)
    thread.start()
    group = broadcast.open_group(store.host, store.port, 0, 2, "gloo", store=store)
    sent = broadcast.send(group, "gloo", tensors, bucket_bytes=64 * 33 * 4 * 2)
    assert sent == sum(t.numel() * t.element_size() for _, t in tensors)

    def failing_export():
        yield tensors[0]
        yield tensors[1]
        raise ValueError("export failed")

    with pytest.raises(ValueError, match="export failed"):
        broadcast.send(group, "gloo", failing_export(), bucket_bytes=1)  # one bucket per tensor
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert list(got) == [n for n, _ in tensors]
    assert all(got[n].dtype == t.dtype and torch.equal(got[n], t) for n, t in tensors)
    assert seen_before_abort == ["layer0.weight"] and errors == [
        "the sender stopped this version midway (its own error says why)"]
