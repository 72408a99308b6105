"""Finding runs and checkpoints in a Ray Train storage path (a local directory or a cloud URI).

Ray Train writes ``<storage_path>/<run_name>/checkpoint_<step>/`` and, when a run name is reused, restores the
run's latest checkpoint into the workers. This module only decides which run name to use, so that a fresh run
never picks up an old one by accident and ``trainer.resume=true`` finds the one to continue.
"""

from __future__ import annotations

import os
import re
import time

from rayalign.config import ConfigError, TrainerConfig

CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")


def absolute_storage(storage_path: str) -> str:
    """Ray Train wants absolute local paths; URIs pass through."""
    return storage_path if "://" in storage_path else os.path.abspath(os.path.expanduser(storage_path))


def _listdir(path: str) -> list[tuple[str, bool, float]]:
    """(name, is_dir, mtime) under ``path`` (empty when it does not exist)."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return [(os.path.basename(i.path.rstrip("/")), i.type == pafs.FileType.Directory,
             i.mtime.timestamp() if i.mtime else 0.0) for i in infos]


def checkpoint_steps(storage_path: str, run_name: str) -> list[int]:
    """Steps with a checkpoint directory in the run, ascending."""
    run = f"{storage_path.rstrip('/')}/{run_name}"
    return sorted(int(m.group(1)) for name, is_dir, _ in _listdir(run) if is_dir and (m := CHECKPOINT_DIR.match(name)))


def resolve_run(trainer: TrainerConfig, prefix: str = "ppo") -> tuple[str, str, bool]:
    """(absolute storage path, run name, resuming). Raises ConfigError on a resume with nothing to resume, or a
    fresh run pointed at a run that already has checkpoints (Ray Train would silently continue it)."""
    storage = absolute_storage(trainer.storage_path)
    if trainer.resume:
        name = trainer.run_name
        if not name:
            runs = [(mtime, n) for n, is_dir, mtime in _listdir(storage) if is_dir and checkpoint_steps(storage, n)]
            if not runs:
                raise ConfigError(f"trainer.resume: no run with a checkpoint under {storage}")
            name = max(runs)[1]
        elif not checkpoint_steps(storage, name):
            raise ConfigError(f"trainer.resume: {storage}/{name} holds no checkpoint")
        return storage, name, True
    name = trainer.run_name or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    if checkpoint_steps(storage, name):
        raise ConfigError(f"trainer.run_name: {storage}/{name} already holds checkpoints; pass trainer.resume=true "
                          "to continue it, or choose another run name")
    return storage, name, False
