"""Preference datasets: plain and conversational rows, KTO labels, bad rows counted by reason, tokenization."""

from __future__ import annotations

import json

import pytest

from rayalign.data.preferences import drop_overlong, load_preferences, load_sft, split_holdout, tokenize
from rayalign.data.prompts import DatasetError


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_pairs_plain_and_conversational_with_bad_rows_counted(tmp_path):
    good = {"prompt": "Protein for a salad?", "chosen": "Chickpeas.", "rejected": "Chicken."}
    chat = {"prompt": [{"role": "user", "content": "A soup?"}],
            "chosen": [{"role": "assistant", "content": "Lentil soup."}],
            "rejected": [{"role": "assistant", "content": "Beef broth soup."}]}
    implicit = {"chosen": [{"role": "user", "content": "Pasta?"}, {"role": "assistant", "content": "Pesto."}],
                "rejected": [{"role": "user", "content": "Pasta?"}, {"role": "assistant", "content": "Carbonara."}]}
    data = load_preferences(_write(tmp_path / "p.jsonl", [
        good, chat, implicit, "{not json", {"prompt": "x", "chosen": "same", "rejected": " same "},
        {"prompt": "x", "chosen": "", "rejected": "b"}, {"prompt": "x", "chosen": "a"},
        {"prompt": "x", "chosen": [{"role": "user", "content": "no answer"}], "rejected": "b"}]))
    assert [(e.prompt, e.chosen, e.rejected) for e in data.examples] == [
        ((("user", "Protein for a salad?"),), "Chickpeas.", "Chicken."),
        ((("user", "A soup?"),), "Lentil soup.", "Beef broth soup."),
        ((("user", "Pasta?"),), "Pesto.", "Carbonara.")]
    assert data.skipped == {"unparsable line": 1, "identical chosen and rejected": 1, "empty side": 1,
                            "missing column rejected": 1, "response not text or an assistant message": 1}


def test_kto_rows_and_nothing_usable(tmp_path):
    data = load_preferences(_write(tmp_path / "k.jsonl", [
        {"prompt": "q", "completion": "Tofu.", "label": True}, {"prompt": "q", "completion": "Ham.", "label": 0},
        {"prompt": "q", "completion": "x", "label": "maybe"}]), labelled=True)
    assert [(e.chosen, e.label) for e in data.examples] == [("Tofu.", True), ("Ham.", False)]
    assert data.skipped == {"label not true/false": 1}
    with pytest.raises(DatasetError, match="no usable preference pairs .*1 missing column chosen"):
        load_preferences(_write(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": "x"}]))
    with pytest.raises(DatasetError, match="preference file not found"):
        load_preferences(str(tmp_path / "missing.jsonl"))


def test_parquet_and_datasets_directory(tmp_path):
    import datasets

    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name in ("p.parquet", "saved"):
        data = load_preferences(str(tmp_path / name))
        assert [e.chosen for e in data.examples] == [r["chosen"] for r in rows]
    train, held = split_holdout(data, 0.2, seed=0)
    assert len(train.examples) == 4 and len(held.examples) == 1
    assert set(train.examples) | set(held.examples) == set(data.examples)
    assert split_holdout(data, 0.2, seed=0) == (train, held)  # deterministic


def test_tokenize_ends_responses_like_the_policy_and_drops_overlong(model_path, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = load_preferences(_write(tmp_path / "p.jsonl", [
        {"prompt": "Protein for a salad?", "chosen": "Chickpeas.", "rejected": "Chicken."},
        {"prompt": "Long?", "chosen": "word " * 300, "rejected": "short"}]))
    rows = tokenize(data.examples, tokenizer)
    chosen, rejected = rows[0]
    assert chosen.prompt_token_ids == rejected.prompt_token_ids
    assert chosen.prompt_token_ids[-3:] == tuple(tokenizer("<|im_start|>assistant\n")["input_ids"])[-3:]
    assert chosen.response_token_ids[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(chosen.response_token_ids[:-1]) == "Chickpeas."
    kept, kept_rows = drop_overlong(data, rows, max_length=100)
    assert len(kept.examples) == len(kept_rows) == 1 and kept.skipped == {"longer than 100 tokens": 1}


def test_sft_rows_by_column_conversations_and_bad_rows_counted(tmp_path, caplog):
    rows = [{"prompt": "Soup?", "completion": "Lentil soup."},
            {"prompt": [{"role": "user", "content": "Pasta?"}], "completion": [{"role": "assistant",
                                                                             "content": "Pesto."}]},
            {"prompt": "x", "completion": "  "}, {"prompt": "x"}, {"completion": "orphan"}, "{oops"]
    data = load_sft(_write(tmp_path / "s.jsonl", rows))
    assert [(e.prompt, e.chosen) for e in data.examples] == [((("user", "Soup?"),), "Lentil soup."),
                                                             ((("user", "Pasta?"),), "Pesto.")]
    assert data.skipped == {"empty response": 1, "missing column completion": 1, "missing or empty prompt": 1,
                            "unparsable line": 1}
    messages = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tea?"},
                              {"role": "assistant", "content": "Green tea."}]}]
    (example,) = load_sft(_write(tmp_path / "m.jsonl", messages)).examples
    assert example.prompt == (("system", "Be brief."), ("user", "Tea?")) and example.chosen == "Green tea."
    pairs = load_sft("builtin:vegetarian/pipeline_pairs", column="chosen", limit=3)
    assert len(pairs.examples) == 3 and all(e.rejected is None for e in pairs.examples)
    with pytest.raises(DatasetError, match="no response column"):
        load_sft(_write(tmp_path / "n.jsonl", [{"prompt": "q", "answer": "a"}]))
    with pytest.raises(DatasetError, match=r"no usable \(prompt, answer\) rows \(1 empty response\)"):
        load_sft(_write(tmp_path / "e.jsonl", [{"prompt": "q", "answer": ""}]), column="answer")


def test_pairs_keep_the_judge_score_gap_when_both_scores_are_numbers(tmp_path):
    data = load_preferences(_write(tmp_path / "g.jsonl", [
        {"prompt": "q", "chosen": "a", "rejected": "b", "chosen_score": 0.9, "rejected_score": 0.25},
        {"prompt": "q", "chosen": "a", "rejected": "c", "chosen_score": 0.9},
        {"prompt": "q", "chosen": "a", "rejected": "d", "chosen_score": True, "rejected_score": 0}]))
    assert [e.score_gap for e in data.examples] == [pytest.approx(0.65), None, None]
