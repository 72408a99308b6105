"""What a job shows on the terminal: rayalign's own lines, and everything else in a log file.

A default run starts vLLM engines, Ray Train workers, DeepSpeed, Ray Serve and MLflow, which between them print
hundreds of lines (engine configs, weight-loading notices, Triton and deprecation warnings). `quiet` sends all of
that to one log file -- the process's own stdout and stderr at the file-descriptor level, so C extensions and the
Ray processes it starts write there too, and the lines Ray forwards from its workers -- and keeps on the
terminal what rayalign logs (``rayalign.*`` loggers, INFO and up), the job's closing summary (`Console.out`),
errors from any worker, and the reason the job stopped. ``--verbose`` on the command line or
``RAYALIGN_VERBOSE=1`` keeps everything on the terminal, as before.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, TextIO

VERBOSE_ENV = "RAYALIGN_VERBOSE"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_WORKER_ERROR = re.compile(r"\b(ERROR|CRITICAL)\b")
"""A worker's log line at ERROR or above (vLLM's and Ray's format both name the level); a worker's exception
reaches the driver as an error of its own, which `Console.run` shows."""


def split_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--verbose``, and whether it or ``RAYALIGN_VERBOSE`` (1/true/yes) asks for everything."""
    rest = [a for a in argv if a != "--verbose"]
    env = os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")
    return rest, env or len(rest) != len(argv)


class Console:
    """The terminal's streams (``out`` for the job's results, ``err`` for progress and problems) and the log
    file the rest goes to (None when verbose: then everything is on the terminal)."""

    def __init__(self, out: TextIO, err: TextIO, log_path: Path | None):
        self.out, self.err, self.log_path = out, err, log_path

    def watch_ray(self) -> None:
        """Echo ERROR lines from Ray's workers to the terminal (they all go to the log file already). Call it
        after ``ray.init``; a Ray without the hook only loses the echo."""
        if self.log_path is None:
            return
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:  # pragma: no cover - the log file still has everything
            return

        def echo(batch: dict[str, Any]) -> None:
            who = batch.get("actor_name") or batch.get("task_name") or f"pid={batch.get('pid')}"
            for line in batch.get("lines", ()):
                if _WORKER_ERROR.search(line):
                    print(f"({who}) {line}", file=self.err, flush=True)

        dispatcher.add_handler("rayalign_errors", echo)

    def run(self, main: Callable[[], int]) -> int:
        """``main()``, with the reason for any stop (a SystemExit message, an uncaught exception's traceback) on
        the terminal and the log file's path after it. The streams stay redirected: the process is ending, and
        Ray's last lines belong in the log."""
        try:
            return main()
        except SystemExit as e:
            if self.log_path is None or isinstance(e.code, int) or e.code is None:
                raise
            print(e.code, file=self.err, flush=True)
            print(f"(full log: {self.log_path})", file=self.err, flush=True)
            return 1
        except Exception:
            if self.log_path is None:
                raise
            traceback.print_exc()  # into the log
            print(traceback.format_exc().rstrip(), file=self.err, flush=True)
            print(f"(full log: {self.log_path})", file=self.err, flush=True)
            return 1


def quiet(log_path: str | Path, verbose: bool) -> Console:
    """Set up logging for a job: everything at INFO to the log file at ``log_path`` (created, appended to), and
    rayalign's own lines to the terminal. With ``verbose`` nothing is redirected (`Console.log_path` is None)."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format=FORMAT)
        return Console(sys.stdout, sys.stderr, None)
    path = Path(log_path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    out = os.fdopen(os.dup(1), "w", buffering=1)  # the terminal, kept before fds 1 and 2 go to the log
    err = os.fdopen(os.dup(2), "w", buffering=1)
    log = open(path, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)

    root = logging.getLogger()
    root.setLevel(logging.INFO)
    to_file = logging.StreamHandler(log)
    to_file.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(to_file)
    to_terminal = logging.StreamHandler(err)
    to_terminal.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    to_terminal.addFilter(lambda record: record.name.startswith("rayalign"))
    root.addHandler(to_terminal)
    logging.captureWarnings(True)  # Python warnings go to the log file

    console = Console(out, err, path)
    global _active
    _active = console
    return console


_active: Console | None = None


def terminal_err() -> TextIO:
    """Where a one-line error for the user goes: the terminal, also under `quiet`."""
    return _active.err if _active is not None and _active.log_path is not None else sys.stderr
