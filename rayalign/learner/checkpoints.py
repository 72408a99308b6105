"""Finding runs and checkpoints in a Ray Train storage path (a local directory or a cloud URI).

Ray Train writes ``<storage_path>/<run_name>/checkpoint_<step>/`` (every rank's files merged). Once all ranks have
reported a checkpoint, the driver drops a marker file into it; a checkpoint without the marker (a job killed while
saving) is ignored. Resuming loads the latest marked checkpoint explicitly rather than relying on Ray Train's own
run restoration, whose snapshot is written asynchronously and may lag behind a killed job.
"""

from __future__ import annotations

import os
import re
import time
from typing import NamedTuple

from rayalign.config import ConfigError, TrainerConfig

CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")
COMPLETE = ".rayalign_complete"


def absolute_storage(storage_path: str) -> str:
    """Ray Train wants absolute local paths; URIs pass through."""
    return storage_path if "://" in storage_path else os.path.abspath(os.path.expanduser(storage_path))


def _fs(path: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)


def _listdir(path: str) -> list[tuple[str, bool, float]]:
    """(name, is_dir, mtime) under ``path`` (empty when it does not exist)."""
    import pyarrow.fs as pafs

    fs, root = _fs(path)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return [(os.path.basename(i.path.rstrip("/")), i.type == pafs.FileType.Directory,
             i.mtime.timestamp() if i.mtime else 0.0) for i in infos]


def checkpoint_dir(storage_path: str, run_name: str, step: int) -> str:
    return f"{storage_path.rstrip('/')}/{run_name}/checkpoint_{step:06d}"


def mark_complete(storage_path: str, run_name: str, step: int) -> None:
    """Called once every rank's part of the step's checkpoint is in storage."""
    fs, path = _fs(checkpoint_dir(storage_path, run_name, step))
    with fs.open_output_stream(f"{path}/{COMPLETE}") as f:
        f.write(b"ok\n")


def checkpoint_steps(storage_path: str, run_name: str) -> list[int]:
    """Steps with a complete checkpoint in the run, ascending."""
    run = f"{storage_path.rstrip('/')}/{run_name}"
    steps = sorted(int(m.group(1)) for name, is_dir, _ in _listdir(run) if is_dir and (m := CHECKPOINT_DIR.match(name)))
    return [s for s in steps if COMPLETE in {n for n, _, _ in _listdir(checkpoint_dir(storage_path, run_name, s))}]


class RunPlan(NamedTuple):
    storage: str
    """Absolute storage path (or URI) the run checkpoints to."""
    name: str
    """The run's folder under ``storage``."""
    resume_from: str | None
    """A complete checkpoint to restore before the first step; None for a fresh start."""
    fork: bool
    """True when ``resume_from`` belongs to another run (``trainer.resume_from``): a new run (and a new MLflow
    run) continues from its state; False for ``trainer.resume`` (the same run, the same MLflow run)."""


def parse_checkpoint(path: str) -> tuple[str, str, int]:
    """``<storage>/<run>/checkpoint_<step>`` -> (storage, run, step); ConfigError unless it names a complete
    checkpoint."""
    path = absolute_storage(path)
    head, base = path.rstrip("/").rsplit("/", 1)
    storage, run = head.rsplit("/", 1) if "/" in head else ("", head)
    m = CHECKPOINT_DIR.match(base)
    if not m or not storage:
        raise ConfigError(f"trainer.resume_from: expected <storage>/<run>/checkpoint_<step>, got {path}")
    step = int(m.group(1))
    if step not in checkpoint_steps(storage, run):
        raise ConfigError(f"trainer.resume_from: {path} is not a complete checkpoint (missing, or its save was "
                          f"interrupted); complete ones in {storage}/{run}: {checkpoint_steps(storage, run) or 'none'}")
    return storage, run, step


def resolve_run(trainer: TrainerConfig, prefix: str = "ppo") -> RunPlan:
    """Where this job's run lives and what it starts from. Raises ConfigError on a resume with nothing to resume,
    a ``resume_from`` that is not a complete checkpoint, or a fresh run pointed at a run that already has
    checkpoints (Ray Train would silently continue it)."""
    storage = absolute_storage(trainer.storage_path)
    if trainer.resume and trainer.resume_from:
        raise ConfigError("trainer.resume and trainer.resume_from: pick one (resume continues the latest checkpoint "
                          "of a run; resume_from starts a new run from a chosen checkpoint)")
    if trainer.resume:
        name = trainer.run_name
        if not name:
            runs = [(mtime, n) for n, is_dir, mtime in _listdir(storage) if is_dir and checkpoint_steps(storage, n)]
            if not runs:
                raise ConfigError(f"trainer.resume: no run with a checkpoint under {storage}")
            name = max(runs)[1]
        steps = checkpoint_steps(storage, name)
        if not steps:
            raise ConfigError(f"trainer.resume: {storage}/{name} holds no checkpoint")
        return RunPlan(storage, name, checkpoint_dir(storage, name, steps[-1]), False)
    resume_from = None
    if trainer.resume_from:
        source_storage, source_run, step = parse_checkpoint(trainer.resume_from)
        resume_from = checkpoint_dir(source_storage, source_run, step)
    name = trainer.run_name or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    if checkpoint_steps(storage, name):
        raise ConfigError(f"trainer.run_name: {storage}/{name} already holds checkpoints; pass trainer.resume=true "
                          "to continue it, or choose another run name")
    return RunPlan(storage, name, resume_from, resume_from is not None)
