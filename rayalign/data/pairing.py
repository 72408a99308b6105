"""From judged answers to preference data: one (prompt, chosen, rejected) pair per prompt and one labelled row
per answer for KTO, in TRL's column names. Pure functions: jobs/generate_preferences.py calls them per shard.

An answer is a dict with ``prompt_id``, ``prompt``, ``response``, ``source`` (``policy``, a steering prompt's
name, or ``rewrite``), ``round`` (0 for the first answers, r for the r-th rewrite), ``score`` (the reward's
score in [0, 1], None when judging failed) and ``error`` ("" when it was generated and judged).
"""

from __future__ import annotations

import collections
import math
from typing import Any, Iterable, Mapping, Sequence


def _scored(answer: Mapping[str, Any]) -> bool:
    score = answer.get("score")
    return score is not None and not math.isnan(score)


def usable(answer: Mapping[str, Any]) -> bool:
    """Generated, judged (a real number, not None or NaN) and not empty."""
    return not answer.get("error") and _scored(answer) and bool(str(answer["response"]).strip())


def drop_reason(answer: Mapping[str, Any]) -> str:
    """Why an answer cannot be used: ``generation_failed``, ``judge_failed`` or ``empty_response``."""
    error = str(answer.get("error") or "")
    if error.startswith("generation failed"):
        return "generation_failed"
    if error or not _scored(answer):
        return "judge_failed"
    return "empty_response"


def pair_for_prompt(answers: Sequence[Mapping[str, Any]], min_margin: float
                    ) -> tuple[dict[str, Any] | None, str]:
    """The pair of one prompt's answers, or (None, reason).

    Chosen: the best-scored answer, a rewrite included (so a rewrite that beats every first answer is chosen).
    Rejected: the worst-scored first answer (round 0), never a rewrite. Reasons: ``too_few_judged`` (fewer than
    two usable answers), ``margin_below_min`` (chosen - rejected < ``min_margin``), ``identical_answers``.
    """
    judged = [a for a in answers if usable(a)]
    firsts = [a for a in judged if a["round"] == 0]
    if len(judged) < 2 or not firsts:
        return None, "too_few_judged"
    # ties: the earlier answer, so a re-run picks the same pair
    chosen = max(judged, key=lambda a: (a["score"], -a["round"], -judged.index(a)))
    rejected = min(firsts, key=lambda a: (a["score"], firsts.index(a)))
    margin = chosen["score"] - rejected["score"]
    if margin < min_margin:
        return None, "margin_below_min"
    if chosen["response"].strip() == rejected["response"].strip():
        return None, "identical_answers"
    return {"prompt": chosen["prompt"], "chosen": chosen["response"], "rejected": rejected["response"],
            "chosen_score": chosen["score"], "rejected_score": rejected["score"], "margin": margin,
            "chosen_source": chosen["source"], "rejected_source": rejected["source"],
            "prompt_id": chosen["prompt_id"]}, ""


def kto_rows(answers: Iterable[Mapping[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """One (prompt, completion, label) row per usable answer: label = score >= ``threshold``."""
    return [{"prompt": a["prompt"], "completion": a["response"], "label": bool(a["score"] >= threshold),
             "score": a["score"], "source": a["source"], "prompt_id": a["prompt_id"]}
            for a in answers if usable(a)]


def build_preferences(answers: Iterable[Mapping[str, Any]], threshold: float, min_margin: float
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], collections.Counter]:
    """(pairs, kto rows, counts) for the answers of many prompts: counts of answers dropped by reason, prompts
    without a pair by reason (``no_pair/<reason>``), and ``rewrite_chosen``."""
    by_prompt: dict[int, list[Mapping[str, Any]]] = collections.defaultdict(list)
    counts: collections.Counter = collections.Counter()
    for a in answers:
        by_prompt[a["prompt_id"]].append(a)
        if not usable(a):
            counts[drop_reason(a)] += 1
    pairs, kto = [], []
    for prompt_id in sorted(by_prompt):
        group = by_prompt[prompt_id]
        pair, reason = pair_for_prompt(group, min_margin)
        if pair is None:
            counts[f"no_pair/{reason}"] += 1
        else:
            pairs.append(pair)
            counts["rewrite_chosen"] += pair["chosen_source"] == "rewrite"
        kto.extend(kto_rows(group, threshold))
    return pairs, kto, counts


def needs_rewrite(answer: Mapping[str, Any], threshold: float) -> bool:
    """A judged answer scored below the rubric's threshold: it is critiqued and rewritten."""
    return usable(answer) and answer["score"] < threshold
