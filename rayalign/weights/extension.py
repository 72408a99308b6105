"""Mixed into each vLLM worker process (``worker_extension_cls``): loads new weights into the model in place.

Named by its import path in the engine's vLLM arguments, so it must stay importable from every engine node.
"""

from __future__ import annotations

from typing import Any, Iterator

from rayalign.weights.buckets import unpack


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
        """Join a broadcast weight group (`rayalign.weights.broadcast`) as rank ``first_rank`` + this worker's
        rank in its engine; a group joined before is dropped."""
        from rayalign.weights.broadcast import open_group

        self._rayalign_group = None
        group = open_group(host, port, first_rank + self.rank, world_size, backend)  # type: ignore[attr-defined]
        self._rayalign_group = (group, backend)

    def rayalign_receive(self) -> int:
        """Receive one broadcast version into the model in place; returns the bytes received."""
        from rayalign.weights.broadcast import receive

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
