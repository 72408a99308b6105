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
