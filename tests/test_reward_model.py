"""Reward-model components: a real sequence classifier (SmolLM2's backbone with a seeded scalar head) in its Ray
actor, inside a composite with a rule, checked against the same model run here; and validate_judge.py on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_job
from rayalign.config import ConfigError, JudgeConfig, RewardComponent, RewardConfig

PAIRS = [("What protein can I add to a salad?", "Chickpeas, lentils or a boiled egg all work well."),
         ("What protein can I add to a salad?", "Grilled chicken or tuna."),
         ("How do I make soup richer?", "Blend in white beans and finish with a knob of butter.")]


@pytest.fixture(scope="module")
def classifier(model_path, tmp_path_factory) -> Path:
    """SmolLM2 as a 1-label sequence classifier: the real backbone, a seeded random head (nothing downloaded)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("reward_model")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
    torch.nn.init.normal_(model.score.weight, std=0.05)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)
    return out


def _expected(path: Path, pairs) -> list[float]:
    """The classifier's scalar for each pair, computed here one pair at a time (no padding involved)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for prompt, response in pairs:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": response}],
                                      tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out.append(float(model(input_ids=ids).logits[0, 0]))
    return out


def test_reward_model_component_config_errors(tmp_path, model_path):
    from rayalign.judge.reward import build_reward
    from rayalign.models import ModelNotFoundError

    with pytest.raises(ConfigError, match="needs model="):
        RewardComponent(name="rm", kind="reward_model").validate()
    with pytest.raises(ModelNotFoundError):
        build_reward(RewardConfig(components=(RewardComponent(name="rm", kind="reward_model",
                                                              model=str(tmp_path / "nope")),)))
    # a causal LM is not a reward model: transformers would bolt a random head onto it without a word
    with pytest.raises(ConfigError, match="not a sequence classifier"):
        build_reward(RewardConfig(components=(RewardComponent(name="rm", kind="reward_model", model=model_path),)))
    three = tmp_path / "three_labels"
    three.mkdir()
    (three / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"],
                                                   "id2label": {"0": "a", "1": "b", "2": "c"}}))
    with pytest.raises(ConfigError, match="3 labels"):
        build_reward(RewardConfig(components=(RewardComponent(name="rm", kind="reward_model", model=str(three)),)))


@pytest.mark.slow
def test_reward_model_in_a_composite_matches_the_model(local_ray, classifier):
    from rayalign.judge.reward import build_reward
    from rayalign.placement import reward as reward_bundles
    from rayalign.judge.rules import RULES
    from rayalign.judge.scoring import score_to_reward

    config = RewardConfig(judge=JudgeConfig(), components=(
        RewardComponent(name="lexicon", kind="rule", rule="vegetarian_lexicon", weight=1.0),
        RewardComponent(name="rm", kind="reward_model", model=str(classifier), weight=0.5, batch_size=2,
                        max_length=96),
    ))
    # no judge component: only the reward model's actor
    assert [(b.role, dict(b.resources)) for b in reward_bundles(config)] == [("reward model 'rm'", {"CPU": 1.0})]
    reward = build_reward(config)
    too_long = ("Plan my week of dinners.", "Lentil soup. " * 60)
    try:
        judgements = reward([p for p, _ in PAIRS] + [too_long[0]], [r for _, r in PAIRS] + [too_long[1]])
    finally:
        reward.shutdown()

    expected = _expected(classifier, PAIRS)
    for j, (prompt, response), rm in zip(judgements, PAIRS, expected):
        assert j.ok, j.error
        parts = dict(j.components)
        # batched and right-padded in the actor vs one unpadded pair here: fp32, same numbers to 1e-4
        assert parts["rm"] == pytest.approx(rm, abs=1e-4)
        lexicon = score_to_reward(RULES["vegetarian_lexicon"](prompt, response), "logit", (0.01, 0.99))
        assert parts["lexicon"] == pytest.approx(lexicon)
        assert j.reward == pytest.approx(lexicon + 0.5 * rm, abs=1e-4)
    assert len({round(v, 4) for v in expected}) == 3  # the head really reads the text
    # too long for max_length: a failed judgement naming the reason, never a 0
    assert not judgements[-1].ok and "max_length" in judgements[-1].error


@pytest.mark.long  # the validate job's own start
@pytest.mark.slow
def test_validate_judge_on_a_reward_model_composite(tmp_path, classifier):
    from rayalign.data.prompts import dataset_path

    rows = [json.loads(line) for line in dataset_path("builtin:vegetarian/judge_validation").open()]
    data = tmp_path / "slice.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [r for r in rows if r["label"] == 1][:3]
                            + [r for r in rows if r["label"] == 0][:3]))
    reward_file = tmp_path / "reward.yaml"
    reward_file.write_text(
        "components:\n"
        "  - {name: lexicon, kind: rule, rule: vegetarian_lexicon, weight: 1.0}\n"
        f"  - {{name: rm, kind: reward_model, model: '{classifier}', weight: 0.5}}\n")
    result = run_job("validate_judge.py", "--data", str(data), "--reward-config", str(reward_file),
                     "--out", str(tmp_path / "out"), "ray.num_cpus=2", cwd=tmp_path,
                     env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["components"] == ["lexicon", "rm"] and metrics["judged"] == 6
    results = [json.loads(line) for line in (Path(metrics["out"]) / "results.jsonl").read_text().splitlines()]
    assert all(set(r["components"]) == {"lexicon", "rm"} for r in results)


@pytest.mark.slow
def test_a_reward_model_that_cannot_load_stops_the_reward_with_one_line(local_ray, tmp_path):
    from rayalign.judge.openai_judge import JudgeUnavailableError
    from rayalign.judge.reward import build_reward

    broken = tmp_path / "broken"  # a classifier's config.json, but no weights or tokenizer: the actor cannot load
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"],
                                                    "model_type": "llama", "num_labels": 1}))
    reward = build_reward(RewardConfig(components=(RewardComponent(name="rm", kind="reward_model",
                                                                   model=str(broken)),)))
    try:
        with pytest.raises(JudgeUnavailableError, match=r"reward model 'rm' \(.*broken\) is unavailable: .+"):
            reward(["q"], ["a"])
    finally:
        reward.shutdown()
