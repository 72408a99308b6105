"""Sharded Parquet output with a manifest, so that a generation job can stop anywhere and start again.

A job's output directory holds one folder per table (``pairs/``, ``kto/``, ...) of ``part-NNNNN.parquet`` files,
one per input shard, and ``manifest.json``: the settings that decide what the rows are (the *fingerprint*) and, for
every finished shard, its row counts and drop counts. A shard is written to a temporary name and renamed, then the
manifest is rewritten the same way, so a crash leaves finished shards whole and loses only those in flight; a
re-run reads the manifest and skips them. A re-run with other settings is refused (one line), since mixing the
two in one output would be silent nonsense.

The folders load as they are with ``datasets.load_dataset("parquet", data_files="out/pairs/*.parquet")``.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from rayalign.config import ConfigError

MANIFEST = "manifest.json"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class ShardedOutput:
    """The output directory of one generation job (see the module docstring)."""

    def __init__(self, root: str | Path, fingerprint: Mapping[str, Any], schemas: Mapping[str, Any], *,
                 overwrite: bool = False):
        """``schemas``: table name -> pyarrow schema of each table's files (a shard without rows writes none).
        ``overwrite``: forget the shards of an earlier run made with other settings instead of refusing."""
        self.root = Path(root).expanduser()
        self.schemas = dict(schemas)
        self.fingerprint = json.loads(json.dumps(dict(fingerprint), sort_keys=True, default=str))
        self.shards: dict[int, dict[str, Any]] = {}
        path = self.root / MANIFEST
        if path.is_file():
            try:
                manifest = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not a readable manifest ({e}); remove it to start over") from None
            if manifest.get("fingerprint") != self.fingerprint and not overwrite:
                changed = sorted(k for k in set(self.fingerprint) | set(manifest.get("fingerprint", {}))
                                 if manifest.get("fingerprint", {}).get(k) != self.fingerprint.get(k))
                raise ConfigError(f"{self.root} holds shards made with other settings ({', '.join(changed)}); "
                                  f"use another output.dir or output.overwrite=true")
            if manifest.get("fingerprint") == self.fingerprint:
                self.shards = {int(k): v for k, v in manifest.get("shards", {}).items()}
        self.root.mkdir(parents=True, exist_ok=True)
        for table in self.schemas:
            (self.root / table).mkdir(exist_ok=True)
        if overwrite and not self.shards:
            for table in self.schemas:
                for old in (self.root / table).glob("part-*.parquet"):
                    old.unlink()
        self._save()

    def done(self) -> set[int]:
        """Shards finished by this or an earlier run."""
        return set(self.shards)

    def path(self, table: str, shard: int) -> Path:
        return self.root / table / f"part-{shard:05d}.parquet"

    def write(self, shard: int, tables: Mapping[str, Sequence[Mapping[str, Any]]], stats: Mapping[str, Any]) -> None:
        """Write shard ``shard``'s rows of each table, then record it (with ``stats``) as finished."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        for table, schema in self.schemas.items():
            rows = tables.get(table, ())
            path = self.path(table, shard)
            if not rows:  # no file: `datasets`' Parquet reader fails on a file without rows
                path.unlink(missing_ok=True)
                continue
            arrow = pa.Table.from_pylist(list(rows), schema=schema)
            tmp = path.with_name(f".{path.name}.tmp")
            pq.write_table(arrow, tmp)
            os.replace(tmp, path)
        self.shards[shard] = dict(stats)
        self._save()

    def _save(self) -> None:
        body = {"fingerprint": self.fingerprint, "shards": {f"{k:05d}": v for k, v in sorted(self.shards.items())}}
        _write_atomic(self.root / MANIFEST, json.dumps(body, indent=1, sort_keys=True).encode())

    def totals(self, key: str) -> collections.Counter:
        """The sum over finished shards of the counter ``stats[key]`` (e.g. rows dropped, by reason)."""
        total: collections.Counter = collections.Counter()
        for stats in self.shards.values():
            total.update(stats.get(key, {}))
        return total

    def rows(self, table: str, shards: Iterable[int] | None = None) -> Iterable[dict[str, Any]]:
        """The rows of ``table`` in shard order, one shard in memory at a time."""
        import pyarrow.parquet as pq

        for shard in sorted(self.shards if shards is None else shards):
            path = self.path(table, shard)
            if path.is_file():  # a finished shard without rows has no file
                yield from pq.read_table(path).to_pylist()
