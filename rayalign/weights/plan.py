"""The one description of how new weights reach the engines, read by the learner, the engines and the driver."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Protocol

from rayalign.config import LearnerConfig


@dataclasses.dataclass(frozen=True)
class SyncPlan:
    """What travels from the learner to the engines after each update, and how.

    ``format``: "adapter" (the peft LoRA adapter; engines start with vLLM's dynamic LoRA) or "full" (every weight
    of a plain HF model: a full finetune, or LoRA folded into the base). ``route``: "store" (published to the
    versioned `WeightStore`, pulled by each engine) or "broadcast" (a collective broadcast from learner rank 0 to
    every engine worker; full weights only).
    """

    format: Literal["adapter", "full"]
    route: Literal["store", "broadcast"] = "store"

    def __post_init__(self) -> None:
        if self.format not in ("adapter", "full"):
            raise ValueError(f"sync format must be 'adapter' or 'full', not {self.format!r}")
        if self.route not in ("store", "broadcast"):
            raise ValueError(f"sync route must be 'store' or 'broadcast', not {self.route!r}")
        if self.format == "adapter" and self.route == "broadcast":
            raise ValueError("an adapter travels through the store; only full weights are broadcast")

    @classmethod
    def for_learner(cls, learner: LearnerConfig) -> "SyncPlan":
        """The plan the config asks for: ``learner.lora_sync`` picks the format under LoRA (a full finetune always
        sends full weights), ``learner.full_sync`` the route of full weights."""
        adapter = learner.finetune == "lora" and learner.lora_sync == "adapter"
        if adapter:
            return cls("adapter", "store")
        return cls("full", "broadcast" if learner.full_sync == "broadcast" else "store")

    @property
    def engines_need_lora(self) -> bool:
        return self.format == "adapter"


class WeightSender(Protocol):
    """Rank 0 of a broadcast weight group (the learner's: `rayalign.learner.group.BroadcastSender`; a process of
    its own: `rayalign.weights.broadcast.ProcessSender`)."""

    def address(self) -> tuple[str, int, str]:
        """(host, free port, backend) where the group meets: the sender's node."""

    def join(self, host: str, port: int, world_size: int, backend: str) -> None:
        """Join as rank 0; returns once every engine worker has joined too."""

    def send(self, version: int) -> int:
        """Broadcast the current weights (the engines receive meanwhile); returns the bytes sent."""


class WeightSource(Protocol):
    """What holds the trained weights and sends them by a `SyncPlan` (the learner: `rayalign.learner.group.Learner`)."""

    def publish(self, store_name: str, version: int, format: str, dtype: str) -> dict[str, Any]:
        """Publish the current weights as ``version`` to the store named ``store_name``; returns ``bytes``."""

    def weight_sender(self, dtype: str) -> WeightSender:
        """This source as the sender of a broadcast group, sending in ``dtype``."""
