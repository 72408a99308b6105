"""Prompt datasets: JSONL or Parquet rows with a ``prompt`` field, or a dataset shipped inside rayalign.

Shipped datasets are named ``builtin:<name>/<split>``, e.g. ``builtin:vegetarian/train`` (see
``rayalign/datasets/``). Rows without a usable prompt are skipped and counted, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "datasets"


class DatasetError(ValueError):
    """A dataset that cannot be used at all (missing, unreadable, or with no usable row)."""


@dataclasses.dataclass(frozen=True)
class PromptSet:
    prompts: tuple[str, ...]
    source: str
    skipped: int
    """Rows without a non-empty string ``prompt`` (or unparsable lines), and prompts too long for the engines."""


def dataset_path(name: str) -> Path:
    """Path of a prompt file: ``builtin:veg/train`` -> the shipped JSONL, anything else -> that path."""
    if name.startswith(BUILTIN_PREFIX):
        rel = name[len(BUILTIN_PREFIX):]
        path = BUILTIN_DIR / f"{rel}.jsonl"
        if not path.is_file():
            known = sorted(str(p.relative_to(BUILTIN_DIR).with_suffix("")) for p in BUILTIN_DIR.glob("*/*.jsonl"))
            raise DatasetError(f"unknown builtin dataset '{name}' (known: {', '.join(known)})")
        return path
    return Path(name).expanduser()


def load_prompts(name: str, *, limit: int | None = None, field: str = "prompt") -> PromptSet:
    """Read prompts from ``name`` (JSONL, Parquet or ``builtin:...``), keeping file order."""
    path = dataset_path(name)
    if not path.is_file():
        raise DatasetError(f"{name}: prompt file not found")
    rows: list[object]
    skipped = 0
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise DatasetError(f"{name}: not a readable Parquet file ({e})") from None
        if field not in table.column_names:
            raise DatasetError(f"{name}: no '{field}' column (columns: {', '.join(table.column_names)})")
        rows = [{field: v} for v in table.column(field).to_pylist()]
    else:
        rows = []
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DatasetError(f"{name}: not UTF-8 text (byte {e.start}); expected JSONL or .parquet") from None
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: not valid JSON; skipped", name, lineno)
                skipped += 1
    prompts = []
    for row in rows:
        value = row.get(field) if isinstance(row, dict) else None
        if not isinstance(value, str) or not value.strip():
            skipped += 1
            continue
        prompts.append(value.strip())
        if limit is not None and len(prompts) >= limit:
            break
    if skipped:
        log.warning("%s: skipped %d rows without a usable '%s'", name, skipped, field)
    if not prompts:
        raise DatasetError(f"{name}: no usable rows with a non-empty '{field}' string ({skipped} skipped)")
    return PromptSet(prompts=tuple(prompts), source=str(path), skipped=skipped)


def drop_overlong_prompts(prompts: PromptSet, tokenizer: Any, max_prompt_tokens: int) -> PromptSet:
    """``prompts`` without those whose chat-templated form (as the engines send it) is longer than
    ``max_prompt_tokens``: vLLM would refuse the whole batch that held one. They are skipped and counted."""
    def length(prompt: str) -> int:
        return len(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"])

    kept = tuple(p for p in prompts.prompts if length(p) <= max_prompt_tokens)
    dropped = len(prompts.prompts) - len(kept)
    if dropped:
        log.warning("%s: skipped %d prompts longer than %d tokens (engine.max_model_len - sampling.max_new_tokens)",
                    prompts.source, dropped, max_prompt_tokens)
    if not kept:
        raise DatasetError(f"{prompts.source}: every prompt is longer than {max_prompt_tokens} tokens "
                           f"(engine.max_model_len - sampling.max_new_tokens)")
    return dataclasses.replace(prompts, prompts=kept, skipped=prompts.skipped + dropped)




def prompt_indices(num_prompts: int, per_step: int, step: int, seed: int) -> list[int]:
    """Which prompts step ``step`` (1-based) trains on: a fresh seeded shuffle of the dataset every epoch, read in
    order. A pure function of (seed, step), so a resumed run sees exactly the prompts the uninterrupted run would."""
    import random

    orders: dict[int, list[int]] = {}  # a step spans at most a few epochs: shuffle each once
    out = []
    for position in range((step - 1) * per_step, step * per_step):
        epoch, offset = divmod(position, num_prompts)
        if epoch not in orders:
            orders[epoch] = list(range(num_prompts))
            random.Random(seed * 1_000_003 + epoch).shuffle(orders[epoch])
        out.append(orders[epoch][offset])
    return out


@dataclasses.dataclass(frozen=True)
class InputShard:
    """A slice of a prompt file, as `plan_input_shards` found it: rows ``first_row`` .. ``first_row + rows``."""

    index: int
    first_row: int
    rows: int
    offset: int
    """JSONL: the byte offset of the shard's first line (a worker seeks there); Parquet: 0."""
    prompts: int
    """Usable prompts in the shard."""
    skipped: dict[str, int]
    """Rows left out, by reason: ``bad_json_line``, ``missing_prompt`` (no such field, or not a string),
    ``empty_prompt``."""


def _row_prompt(row: object, field: str) -> tuple[str | None, str]:
    value = row.get(field) if isinstance(row, dict) else None
    if not isinstance(value, str):
        return None, "missing_prompt"
    if not value.strip():
        return None, "empty_prompt"
    return value.strip(), ""


def _iter_rows(path: Path, field: str, offset: int = 0) -> Any:
    """(byte offset, prompt or None, reason) per row of a JSONL or Parquet file, streamed, from ``offset``."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            reader = pq.ParquetFile(path)
        except OSError as e:
            raise DatasetError(f"{path}: not a readable Parquet file ({e})") from None
        if field not in reader.schema_arrow.names:
            raise DatasetError(f"{path}: no '{field}' column (columns: {', '.join(reader.schema_arrow.names)})")
        for batch in reader.iter_batches(columns=[field], batch_size=4096):
            for value in batch.column(0).to_pylist():
                yield (0, *_row_prompt({field: value}, field))
        return
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            start = f.tell()
            line = f.readline()
            if not line:
                return
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                yield start, None, "bad_json_line"
                continue
            yield (start, *_row_prompt(row, field))


def plan_input_shards(name: str, shard_size: int, *, limit: int | None = None, field: str = "prompt"
                      ) -> tuple[Path, list[InputShard]]:
    """Read ``name`` once, streaming (memory flat in its length), and cut it into shards of ``shard_size``
    rows (the last ones may hold fewer; with ``limit``, rows after the ``limit``-th usable prompt are left out)."""
    path = dataset_path(name)
    if not path.is_file():
        raise DatasetError(f"{name}: prompt file not found")
    shards: list[InputShard] = []
    row = usable = 0
    current: dict[str, Any] | None = None
    for offset, prompt, reason in _iter_rows(path, field):
        if limit is not None and usable >= limit:
            break
        if current is None:
            current = {"index": len(shards), "first_row": row, "rows": 0, "offset": offset, "prompts": 0,
                       "skipped": {}}
        current["rows"] += 1
        if prompt is None:
            current["skipped"][reason] = current["skipped"].get(reason, 0) + 1
        else:
            current["prompts"] += 1
            usable += 1
        row += 1
        if current["rows"] == shard_size:
            shards.append(InputShard(**current))
            current = None
    if current is not None:
        shards.append(InputShard(**current))
    if not usable:
        skipped = sum(sum(s.skipped.values()) for s in shards)
        raise DatasetError(f"{name}: no usable rows with a non-empty '{field}' string ({skipped} skipped)")
    return path, shards


def read_input_shard(path: str | Path, shard: InputShard, field: str = "prompt") -> list[tuple[int, str]]:
    """(row number, prompt) of the usable rows of ``shard`` (the same rows `plan_input_shards` counted)."""
    path = Path(path)
    out = []
    rows = _iter_rows(path, field, shard.offset) if path.suffix != ".parquet" else _iter_rows(path, field)
    row = shard.first_row if path.suffix != ".parquet" else 0
    for _, prompt, _ in rows:
        if row >= shard.first_row + shard.rows:
            break
        if row >= shard.first_row and prompt is not None:
            out.append((row, prompt))
        row += 1
    return out
