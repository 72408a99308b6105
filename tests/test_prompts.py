"""Prompt datasets: shipped sets, bad rows skipped and counted, clear errors."""

from __future__ import annotations

import json

import pytest

from rayalign.data.prompts import DatasetError, PromptSet, dataset_path, drop_overlong_prompts, load_prompts


def test_shipped_vegetarian_sets():
    train = load_prompts("builtin:vegetarian/train")
    holdout = load_prompts("builtin:vegetarian/holdout")
    assert len(train.prompts) >= 300 and len(holdout.prompts) >= 100
    assert train.skipped == holdout.skipped == 0
    assert not set(train.prompts) & set(holdout.prompts)
    rows = [json.loads(line) for line in dataset_path("builtin:vegetarian/judge_validation").read_text().splitlines()]
    assert len(rows) >= 200
    good = sum(r["label"] == 1 for r in rows)
    assert 0.4 < good / len(rows) < 0.6
    assert {"hidden_animal_ingredient", "mentions_meat_to_avoid", "vegetarian_unhelpful", "injection"} <= {
        r["category"] for r in rows}


def test_bad_rows_are_skipped_and_counted(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\nnot json\n{"prompt": ""}\n{"other": 1}\n\n{"prompt": " b "}\n')
    result = load_prompts(str(path))
    assert result.prompts == ("a", "b") and result.skipped == 3
    assert load_prompts(str(path), limit=1).prompts == ("a",)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["x", None, "y"]}), tmp_path / "p.parquet")
    result = load_prompts(str(tmp_path / "p.parquet"))
    assert result.prompts == ("x", "y") and result.skipped == 1
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "q.parquet")
    with pytest.raises(DatasetError, match="no 'prompt' column"):
        load_prompts(str(tmp_path / "q.parquet"))


def test_errors(tmp_path):
    with pytest.raises(DatasetError, match="prompt file not found"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(DatasetError, match="no usable rows"):
        load_prompts(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DatasetError, match="unknown builtin dataset 'builtin:nope/x'"):
        load_prompts("builtin:nope/x")


def test_unreadable_files_are_one_line_errors(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DatasetError, match="not UTF-8 text"):
        load_prompts(str(tmp_path / "latin1.jsonl"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match="not a readable Parquet file"):
        load_prompts(str(tmp_path / "bad.parquet"))


class _WordTokenizer:
    """One token per word, plus 3 for the chat template (control flow only)."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, return_dict):
        assert add_generation_prompt and tokenize and return_dict
        return {"input_ids": [0] * (len(messages[0]["content"].split()) + 3)}


def test_prompts_too_long_for_the_engines_are_skipped_and_counted():
    prompts = PromptSet(prompts=("one two", "one two three four five", "one"), source="p.jsonl", skipped=1)
    fitted = drop_overlong_prompts(prompts, _WordTokenizer(), max_prompt_tokens=5)
    assert fitted.prompts == ("one two", "one") and fitted.skipped == 2
    with pytest.raises(DatasetError, match="every prompt is longer than 3 tokens"):
        drop_overlong_prompts(prompts, _WordTokenizer(), max_prompt_tokens=3)
