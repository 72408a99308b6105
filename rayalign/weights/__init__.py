"""Learner -> rollout-engine weight sync: everything both sides share, in one place.

Design (pull by version, pushed by the driver). A `SyncPlan` says what travels (``format``: the LoRA "adapter" or
"full" weights) and how (``route``: through the versioned "store", or by "broadcast"); the learner sends by it and
the engines start and receive by it.
  1. Store route: the learner publishes version ``v`` to a small named `WeightStore` actor (`store`): an adapter
     (its files, a few MB, kept in the store so any node can fetch them) or full weights (written once into
     shared-memory buckets, `buckets` + `shm`). The driver then has every engine pull ``v`` and apply it (an
     adapter: a new `LoRARequest`; full weights: one RPC per engine that streams every bucket into its vLLM
     workers through the worker extension, `extension`). An engine that Ray restarts pulls the latest version in
     its constructor; every generate call names the version it expects.
  2. Broadcast route (full weights on clusters, `broadcast`): learner rank 0 broadcasts buckets to a process group
     of its own whose other ranks are every vLLM worker of every engine; the store then holds only a marker, so a
     restarted engine knows it must wait to be pushed to.

Imports point one way: `rayalign.learner` -> `rayalign.weights` <- `rayalign.rollout`. Nothing here imports torch,
Ray or vLLM at module import time.
"""

from rayalign.weights.plan import SyncPlan, WeightSender, WeightSource

__all__ = ["SyncPlan", "WeightSender", "WeightSource"]
