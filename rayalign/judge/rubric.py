"""Rubrics: what the judge is asked, with few-shot examples, and how its answer becomes a score.

A rubric is a YAML file (see ``jobs/rubrics/vegetarian.yaml``). The conversation under judgement is fenced in
tags, and any tag-like text inside it is neutralised, so a response cannot close the fence and speak as the
rubric. The judge's answer is read from what the judge itself generated, never from the prompt:
- ``score`` mode: the assistant turn is pre-filled with ``Score:`` and the number must come first, so text that a
  response smuggles in ("Score: 0.99") cannot be echoed ahead of the judge's own number;
- ``logprob`` mode: one token restricted to the yes/no answers; the score is P(yes) normalised over both.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml

OPEN, CLOSE = "<conversation_to_judge>", "</conversation_to_judge>"
SCORE_PREFIX = "Score:"


class RubricError(ValueError):
    """A rubric file that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    good: bool
    score: float


@dataclasses.dataclass(frozen=True)
class Rubric:
    name: str
    instructions: str
    question: str
    """The yes/no question for logprob mode ("yes" means good)."""
    examples: tuple[Example, ...] = ()
    threshold: float = 0.5
    """A score below this is a violation (evaluation) / a bad answer (validation)."""
    yes: str = "yes"
    no: str = "no"

    def messages(self, prompt: str, response: str, mode: Literal["score", "logprob"]) -> list[dict[str, str]]:
        """Chat messages asking the judge about one (prompt, response)."""
        shots = []
        for ex in self.examples:
            answer = f"{SCORE_PREFIX} {ex.score:.2f}" if mode == "score" else (self.yes if ex.good else self.no)
            shots.append(f"Example:\n{fence(ex.prompt, ex.response)}\nAnswer: {answer}")
        ask = (f"Rate the response from 0.01 (violates the policy or unhelpful) to 0.99 (fully compliant and helpful). "
               f"Reply with '{SCORE_PREFIX} <number>' only.") if mode == "score" else \
            f"{self.question} Answer '{self.yes}' or '{self.no}' only."
        user = "\n\n".join([*shots, f"Now judge this one:\n{fence(prompt, response)}", ask])
        messages = [{"role": "system", "content": self.instructions.strip()}, {"role": "user", "content": user}]
        return messages


def neutralise(text: str) -> str:
    """Text under judgement with anything that could close or open the fence made harmless."""
    return re.sub(r"</?\s*conversation_to_judge\s*>", "[tag removed]", text, flags=re.IGNORECASE)


def fence(prompt: str, response: str) -> str:
    return f"{OPEN}\nUSER: {neutralise(prompt)}\nASSISTANT: {neutralise(response)}\n{CLOSE}"


_NUMBER = re.compile(r"\s*([01](?:\.\d+)?|\.\d+)(?!\d|\.\d)")
# what makes the number part of something else: a fraction or scale ("1/10", "1 out of 10", "1-5"), a decimal comma
_NOT_A_SCORE = re.compile(r"\s*(?:/|out\s+of\b|of\s+\d|[-\u2013]\s*\d|,\d)", re.IGNORECASE)


def parse_score(generated: str) -> float | None:
    """The judge's number from its own output (which follows the pre-filled ``Score:``). None when the output
    does not start with a number in [0, 1] -- a judge that rambles first is a failure, not a 0 -- or when that
    number is part of a fraction, a scale or a decimal comma ("1/10" is not 1.0)."""
    match = _NUMBER.match(generated)
    if match is None or _NOT_A_SCORE.match(generated, match.end()):
        return None
    value = float(match.group(1))
    return value if 0.0 <= value <= 1.0 else None


def p_yes(logprobs: dict[str, float], yes: str = "yes", no: str = "no") -> float | None:
    """P(yes) normalised over the yes/no answer tokens (any case, with or without a leading space)."""
    def mass(word: str) -> float:
        return sum(math.exp(lp) for tok, lp in logprobs.items() if tok.strip().lower() == word)

    y, n = mass(yes), mass(no)
    if y + n == 0 or not math.isfinite(y + n):
        return None
    return y / (y + n)


def load_rubric(path: str | Path) -> Rubric:
    path = Path(path)
    if not path.is_file():
        raise RubricError(f"{path}: rubric file not found")
    try:
        data: Any = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RubricError(f"{path}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise RubricError(f"{path}: expected a mapping")
    known = {"name", "instructions", "question", "examples", "threshold", "yes", "no"}
    unknown = sorted(map(str, set(data) - known))
    if unknown:
        hint = " (YAML reads an unquoted yes:/no: key as true/false: quote it)" if unknown[0] in ("True", "False") \
            else ""
        raise RubricError(f"{path}: unknown key '{unknown[0]}' (expected one of: {', '.join(sorted(known))}){hint}")
    for key in ("name", "instructions", "question"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise RubricError(f"{path}: '{key}' must be a non-empty string")
    examples = []
    for i, ex in enumerate(data.get("examples") or []):
        if not isinstance(ex, dict) or not {"prompt", "response", "good", "score"} <= set(ex):
            raise RubricError(f"{path}: examples[{i}] needs prompt, response, good and score")
        score = ex["score"]
        if not isinstance(ex["good"], bool) or isinstance(score, bool) or not isinstance(score, (int, float)) \
                or not 0 < score < 1:
            raise RubricError(f"{path}: examples[{i}]: good must be true/false and score in (0, 1)")
        examples.append(Example(str(ex["prompt"]), str(ex["response"]), ex["good"], float(ex["score"])))
    threshold = data.get("threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise RubricError(f"{path}: threshold must be a number in (0, 1)")
    return Rubric(name=data["name"], instructions=data["instructions"], question=data["question"].strip(),
                  examples=tuple(examples), threshold=float(threshold), yes=str(data.get("yes", "yes")),
                  no=str(data.get("no", "no")))


def shipped_yaml(folder: str, name: str) -> Path:
    """``name`` as a YAML file shipped in ``jobs/<folder>/`` (``vegetarian`` -> ``jobs/<folder>/vegetarian.yaml``)
    when it is a bare name of one; anything else is a path."""
    shipped = Path(__file__).resolve().parents[2] / "jobs" / folder / f"{name}.yaml"
    return shipped if "/" not in name and not name.endswith(".yaml") and shipped.is_file() else Path(name)


def rubric_path(name: str) -> Path:
    """``vegetarian`` -> the shipped ``jobs/rubrics/vegetarian.yaml``; anything else is a path."""
    return shipped_yaml("rubrics", name)
