"""MLflow tracking used by every job: one run, its config (secrets redacted), per-step metrics, tables, artifacts.

The store is ``$MLFLOW_TRACKING_URI`` when set, otherwise ``sqlite:///<cwd>/mlflow.db`` with artifacts under
``<cwd>/mlartifacts`` -- local, inside the working directory, readable with
``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from rayalign.config import flatten, redact, to_dict

log = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
_MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, or a SQLite store in the current directory."""
    return os.environ.get(TRACKING_URI_ENV) or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


class Tracker:
    """One MLflow run. Use as a context manager; a run that raises is marked FAILED, not left RUNNING."""

    def __init__(self, experiment: str, *, run_name: str = "", config: Any = None, tags: Mapping[str, str] | None = None,
                 run_id: str | None = None):
        """``run_id``: continue that run (a resumed job); its params stay, the new config is logged as a file."""
        import mlflow

        self._mlflow = mlflow
        self.uri = tracking_uri()
        default_store = TRACKING_URI_ENV not in os.environ  # read before set_tracking_uri, which sets it
        mlflow.set_tracking_uri(self.uri)
        if mlflow.get_experiment_by_name(experiment) is None:
            artifacts = None
            if default_store:
                artifacts = (Path.cwd() / "mlartifacts").as_uri()
            mlflow.create_experiment(experiment, artifact_location=artifacts)
        mlflow.set_experiment(experiment)
        if run_id:
            self.run = mlflow.start_run(run_id=run_id)
        else:
            self.run = mlflow.start_run(run_name=run_name or None, tags=dict(tags or {}))
        self.run_id: str = self.run.info.run_id
        if config is not None and run_id:
            self.log_text(yaml.safe_dump(redact(to_dict(config)), sort_keys=False),
                          f"config_resumed_{time.strftime('%Y%m%d-%H%M%S')}.yaml")
        elif config is not None:
            self.log_config(config)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type is not None else "FINISHED")

    def end(self, status: str = "FINISHED") -> None:
        if self._mlflow.active_run() is not None:
            self._mlflow.end_run(status=status)

    def log_config(self, config: Any) -> None:
        """The resolved config as params (flattened, secrets redacted) and as ``config.yaml``."""
        data = redact(to_dict(config))
        params = {k: _param_value(v) for k, v in flatten(data).items()}
        self._mlflow.log_params(params)
        self._mlflow.log_text(yaml.safe_dump(data, sort_keys=False), "config.yaml")

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Numeric metrics at ``step``; NaN/inf and non-numbers are reported in the log, never silently dropped."""
        clean = {}
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                log.warning("metric %s=%r is not a finite number; not logged", key, value)
                continue
            clean[key] = float(value)
        if clean:
            self._mlflow.log_metrics(clean, step=step)

    def log_table(self, rows: Sequence[Mapping[str, Any]], name: str) -> None:
        """A list of dicts as an MLflow table artifact ``name`` (e.g. ``samples/step_0004.json``)."""
        if not rows:
            return
        columns = {key: [row.get(key) for row in rows] for key in rows[0]}
        self._mlflow.log_table(data=columns, artifact_file=name)

    def log_text(self, text: str, name: str) -> None:
        self._mlflow.log_text(text, name)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        self._mlflow.log_dict(dict(data), name)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path)
        else:
            self._mlflow.log_artifact(str(path), artifact_path)

    def log_figure(self, figure: Any, name: str) -> None:
        self._mlflow.log_figure(figure, name)

    def artifact_dir(self) -> str:
        return self._mlflow.get_artifact_uri()


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    return text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."
