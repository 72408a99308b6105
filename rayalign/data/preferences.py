"""Datasets for the offline objectives: pairs (prompt, chosen, rejected), labelled responses (prompt, completion,
label) for KTO, and (prompt, response) rows for SFT, read from JSONL, Parquet, a saved `datasets` directory or a
shipped set.

Rows come plain (strings) or conversational, as in TRL: ``prompt`` a list of messages, ``chosen`` / ``rejected``
/ ``completion`` a list ending in the assistant's message (a conversation that holds its own prompt -- every
message but the last -- is accepted without a ``prompt`` column). A row that cannot be used is skipped and counted
by reason: a missing column, a side that is empty or not text, identical chosen and rejected, and (when tokenized)
more tokens than ``max_length``; nothing left stops the job with one line.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
from typing import Any, Iterable, Sequence

from rayalign.data.prompts import DatasetError, dataset_path
from rayalign.types import Rollout

log = logging.getLogger(__name__)

Messages = tuple[tuple[str, str], ...]
"""A conversation as ((role, content), ...): hashable, so pairs can be compared and deduplicated."""


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    """One training example: a pair (``rejected`` set) or, for KTO, one response with its ``label``."""

    prompt: Messages
    chosen: str
    """The preferred response (for KTO and SFT: the response)."""
    rejected: str | None = None
    label: bool | None = None
    """KTO only: whether the response is desirable."""
    score_gap: float | None = None
    """Pairs whose rows carry their judge's scores (``chosen_score``, ``rejected_score``): chosen's minus
    rejected's (a reward model's margin)."""


@dataclasses.dataclass(frozen=True)
class PreferenceSet:
    examples: tuple[PreferenceExample, ...]
    source: str
    skipped: dict[str, int]
    """Rows left out, by reason."""

    def without(self, reason: str, keep: Sequence[bool]) -> "PreferenceSet":
        """The examples whose ``keep`` is True; the others counted under ``reason``."""
        dropped = sum(not k for k in keep)
        skipped = dict(self.skipped)
        if dropped:
            skipped[reason] = skipped.get(reason, 0) + dropped
        return PreferenceSet(tuple(e for e, k in zip(self.examples, keep) if k), self.source, skipped)


def _read_rows(name: str) -> tuple[list[Any], str, int]:
    """Rows of a JSONL / Parquet file or a `datasets.save_to_disk` directory: (rows, source, unparsable lines)."""
    path = dataset_path(name)
    if path.is_dir():
        try:
            import datasets

            data = datasets.load_from_disk(str(path))
        except Exception as e:  # not a saved dataset: say so in one line
            raise DatasetError(f"{name}: not a saved `datasets` directory ({type(e).__name__}: {e})") from None
        if isinstance(data, datasets.DatasetDict):
            if "train" not in data:
                raise DatasetError(f"{name}: a DatasetDict without a 'train' split (splits: {', '.join(data)})")
            data = data["train"]
        return list(data), str(path), 0
    if not path.is_file():
        raise DatasetError(f"{name}: preference file not found")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist(), str(path), 0
        except (pa.ArrowException, OSError) as e:
            raise DatasetError(f"{name}: not a readable Parquet file ({e})") from None
    rows, bad = [], 0
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{name}: not UTF-8 text (byte {e.start}); expected JSONL or .parquet") from None
    for line in text.splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return rows, str(path), bad


def _messages(value: Any) -> Messages | None:
    """A conversation (list of {"role", "content"} with string content) as `Messages`, else None."""
    if not isinstance(value, list) or not value:
        return None
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return None
        out.append((m["role"], m["content"]))
    return tuple(out)


def _response(value: Any) -> tuple[Messages | None, str | None]:
    """A response column: plain text, or a conversation ending in the assistant's message. Returns (the
    conversation before that message, or None; the response text, or None when unusable)."""
    if isinstance(value, str):
        return None, value
    conversation = _messages(value)
    if conversation is None or conversation[-1][0] != "assistant":
        return None, None
    return (conversation[:-1] or None), conversation[-1][1]


def _prompt(row: dict, implicit: Messages | None) -> Messages | None:
    value = row.get("prompt")
    if isinstance(value, str):
        return (("user", value),) if value.strip() else None
    if value is None:
        return implicit
    return _messages(value)


def parse_example(row: Any, labelled: bool) -> tuple[PreferenceExample | None, str | None]:
    """One row -> (example, None) or (None, the reason it is skipped)."""
    if not isinstance(row, dict):
        return None, "not an object"
    columns = ("completion", "label") if labelled else ("chosen", "rejected")
    missing = [c for c in columns if c not in row] + ([] if "prompt" in row or not labelled else [])
    if missing:
        return None, f"missing column {missing[0]}"
    if labelled:
        implicit, completion = _response(row["completion"])
        if not isinstance(row["label"], bool) and row["label"] not in (0, 1):
            return None, "label not true/false"
        sides = [completion]
    else:
        implicit, chosen = _response(row["chosen"])
        implicit_r, rejected = _response(row["rejected"])
        sides = [chosen, rejected]
        if implicit != implicit_r:
            return None, "chosen and rejected under different prompts"
    if any(s is None for s in sides):
        return None, "response not text or an assistant message"
    if any(not s.strip() for s in sides):
        return None, "empty side"
    prompt = _prompt(row, implicit)
    if prompt is None:
        return None, "missing or empty prompt"
    if labelled:
        return PreferenceExample(prompt, sides[0], label=bool(row["label"])), None
    if sides[0].strip() == sides[1].strip():
        return None, "identical chosen and rejected"
    scores = [row.get("chosen_score"), row.get("rejected_score")]
    gap = None
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores):
        gap = float(scores[0]) - float(scores[1])
    return PreferenceExample(prompt, sides[0], sides[1], score_gap=gap), None


SFT_COLUMNS = ("completion", "response", "chosen", "messages")
"""Where an SFT row's response is looked for, in this order, when the job names no column: TRL's prompt-completion
rows, (prompt, response) rows, a preference pair's chosen side, or a whole conversation."""


def parse_sft_example(row: Any, column: str) -> tuple[PreferenceExample | None, str | None]:
    """One SFT row -> (example, None) or (None, the reason it is skipped). The response is ``row[column]``: text
    (the prompt from ``prompt``) or a conversation ending in the assistant's message (the prompt: ``prompt``, or
    the messages before it)."""
    if not isinstance(row, dict):
        return None, "not an object"
    if column not in row:
        return None, f"missing column {column}"
    implicit, response = _response(row[column])
    if response is None:
        return None, "response not text or an assistant message"
    if not response.strip():
        return None, "empty response"
    prompt = _prompt(row, implicit)
    if prompt is None:
        return None, "missing or empty prompt"
    return PreferenceExample(prompt, response), None


def load_sft(name: str, *, column: str = "", limit: int | None = None) -> PreferenceSet:
    """Read (prompt, response) rows from ``name`` for SFT, skipping and counting bad rows. ``column``: where the
    response is ("": the first of `SFT_COLUMNS` that the first row holds; the choice is logged)."""
    rows, source, unparsable = _read_rows(name)
    if not column:
        first = next((r for r in rows if isinstance(r, dict)), {})
        column = next((c for c in SFT_COLUMNS if c in first), "")
        if not column:
            raise DatasetError(f"{name}: no response column (looked for {', '.join(SFT_COLUMNS)}); name one with "
                               "data.response_column")
        log.info("%s: responses from column %r", name, column)
    return _parse_rows(name, rows, source, unparsable, lambda row: parse_sft_example(row, column), limit,
                       f"(prompt, {column}) rows")


def load_preferences(name: str, *, labelled: bool = False, limit: int | None = None) -> PreferenceSet:
    """Read pairs (``labelled=False``) or KTO's labelled responses from ``name``, skipping and counting bad rows."""
    rows, source, unparsable = _read_rows(name)
    return _parse_rows(name, rows, source, unparsable, lambda row: parse_example(row, labelled), limit,
                       "labelled responses" if labelled else "preference pairs")


def _parse_rows(name: str, rows: list[Any], source: str, unparsable: int, parse: Any, limit: int | None,
                what: str) -> PreferenceSet:
    """``parse`` (row -> (example, None) | (None, reason)) over ``rows``: the examples, the rest counted by reason;
    none left is a DatasetError naming ``what`` was wanted."""
    skipped: collections.Counter[str] = collections.Counter()
    if unparsable:
        skipped["unparsable line"] = unparsable
    examples = []
    for row in rows:
        example, reason = parse(row)
        if example is None:
            skipped[reason] += 1
            continue
        examples.append(example)
        if limit is not None and len(examples) >= limit:
            break
    if skipped:
        log.warning("%s: skipped %s", name, ", ".join(f"{n} ({r})" for r, n in sorted(skipped.items())))
    if not examples:
        detail = ", ".join(f"{n} {r}" for r, n in sorted(skipped.items())) or "the file is empty"
        raise DatasetError(f"{name}: no usable {what} ({detail})")
    return PreferenceSet(tuple(examples), source, dict(skipped))


def load_split(load: Any, data: Any, seed: int) -> tuple[PreferenceSet, PreferenceSet]:
    """(train, eval) sets for ``data`` (a `rayalign.config.PreferenceDataConfig`): ``load(name, limit)`` of
    ``data.eval`` when given, else a seeded hold-out of ``data.eval_fraction`` of ``data.train``."""
    train = load(data.train, data.limit)
    if data.eval:
        return train, load(data.eval, None)
    return split_holdout(train, data.eval_fraction, seed)


def split_holdout(data: PreferenceSet, fraction: float, seed: int) -> tuple[PreferenceSet, PreferenceSet]:
    """(train, eval): a seeded shuffle's last ``fraction`` of the examples (at least one each when possible)."""
    import random

    order = list(range(len(data.examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(order) - 1, max(1, round(fraction * len(order)))) if fraction > 0 else 0
    held = set(order[len(order) - n_eval:])
    pick = lambda keep: tuple(e for i, e in enumerate(data.examples) if (i in held) == keep)  # noqa: E731
    return (PreferenceSet(pick(False), data.source, data.skipped), PreferenceSet(pick(True), data.source, {}))


def tokenize(examples: Iterable[PreferenceExample], tokenizer: Any) -> list[list[Rollout]]:
    """Each example's rows as `Rollout`s the learner pads: [chosen, rejected] for a pair, [response] for KTO.

    The prompt is the chat-templated conversation up to the assistant's turn (as the engines send it); the
    response is its text's tokens followed by the end-of-turn token, as the policy would end it when sampled.
    """
    out = []
    eos = tokenizer.eos_token_id
    for e in examples:
        prompt_ids = tuple(tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in e.prompt],
                                                         add_generation_prompt=True, tokenize=True,
                                                         return_dict=True)["input_ids"])
        responses = [e.chosen] if e.rejected is None else [e.chosen, e.rejected]
        rows = []
        for text in responses:
            ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) + ((eos,) if eos is not None else ())
            rows.append(Rollout(prompt=e.prompt[-1][1], response=text, prompt_token_ids=prompt_ids,
                                response_token_ids=ids, logprobs=(), finish_reason="stop", policy_version=0,
                                engine_id=-1))
        out.append(rows)
    return out


def drop_overlong(data: PreferenceSet, rows: list[list[Rollout]],
                  max_length: int) -> tuple[PreferenceSet, list[list[Rollout]]]:
    """Leave out examples with a row of more than ``max_length`` prompt + response tokens (counted)."""
    keep = [all(len(r.prompt_token_ids) + len(r.response_token_ids) <= max_length for r in ex) for ex in rows]
    kept = data.without(f"longer than {max_length} tokens", keep)
    if not kept.examples:
        raise DatasetError(f"{data.source}: every example is longer than max_length={max_length} tokens")
    return kept, [r for r, k in zip(rows, keep) if k]
