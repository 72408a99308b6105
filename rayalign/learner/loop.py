"""The Ray Train entry point of every learner rank: build the worker, then run the driver's commands until "stop".

Workers run no training loop of their own: the job's driver posts commands to the `LearnerHub` actor
(`rayalign.learner.group`), every rank takes each one from its inbox, runs the `LearnerWorker` method of that
name and posts its reply. A failure is posted with its traceback, so the driver raises it instead of waiting.
"""

from __future__ import annotations

import os
import traceback
from typing import Any


def train_loop(spec: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the learner's `TorchTrainer`."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if spec["learner"].num_gpus_per_worker == 0 else "cuda")
    import ray
    import ray.train

    from rayalign.learner.worker import LearnerWorker

    hub = ray.get_actor(spec["hub_name"], namespace=spec["namespace"])
    rank = ray.train.get_context().get_world_rank()
    try:
        worker = LearnerWorker(spec)
    except Exception:
        ray.get(hub.fail.remote(rank, traceback.format_exc()))
        raise
    while True:
        command_id, name, kwargs = ray.get(hub.next.remote(rank))
        if name == "stop":
            ray.get(hub.reply.remote(command_id, rank, None))
            return
        try:
            result = getattr(worker, name)(**kwargs)
        except Exception:
            ray.get(hub.fail.remote(rank, traceback.format_exc(), command_id))
            raise
        ray.get(hub.reply.remote(command_id, rank, result))
