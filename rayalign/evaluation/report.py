"""The evaluation report: its numbers, markdown and plots (no Ray; matplotlib only inside `plot`).

A report is a plain dict (what ``jobs/evaluate.py`` writes as ``report.json``): ``models`` (one summary per
model, the base first), ``pairwise`` (each aligned model against the base) and ``samples`` (side by side, where
the models differ most). Judge violations are counted over the *judged* responses: a failed judgement is counted
in ``failures``, never as a violation or a pass, so violations + passes + failures = prompts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from rayalign.evaluation import heldout as H


def histogram(values: Sequence[float], bins: int, lo: float = 0.0, hi: float = 1.0) -> dict[str, list]:
    """Counts of ``values`` in ``bins`` equal bins over [lo, hi] (the last bin includes ``hi``)."""
    width = (hi - lo) / bins
    counts = [0] * bins
    for v in values:
        if not lo <= v <= hi:
            raise ValueError(f"value {v} outside [{lo}, {hi}]")
        counts[min(int((v - lo) / width), bins - 1)] += 1
    return {"edges": [round(lo + i * width, 6) for i in range(bins + 1)], "counts": counts}


def answers(rollouts: Sequence[Any]) -> dict[str, list]:
    """What a report reads of a model's rollouts, JSON-able (a training checkpoint keeps the base's): responses,
    response lengths in tokens and finish reasons, one each per prompt."""
    return {"responses": [r.response for r in rollouts], "tokens": [len(r.response_token_ids) for r in rollouts],
            "finish_reasons": [r.finish_reason for r in rollouts]}


def model_summary(responses: Sequence[str], scores: Sequence[float | None] | None,
                  rule_scores: Sequence[float] | None, lengths: Sequence[int], finish_reasons: Sequence[str],
                  threshold: float, bins: int = 10) -> dict[str, Any]:
    """One model's numbers from its responses, per-prompt judge scores (None: judging failed; ``scores`` None: no
    judge), rule scores (None: no rule), response lengths in tokens and finish reasons. A score below
    ``threshold`` is a violation. The independent term list, distinct-2, refusals and repetitive answers come
    from the responses (`rayalign.evaluation.heldout`)."""
    n = len(responses)
    meat, refusals = sum(map(H.mentions_meat, responses)), sum(map(H.is_refusal, responses))
    repetitive = sum(map(H.is_repetitive, responses))
    summary: dict[str, Any] = {
        "prompts": n,
        "judge": None,
        "rule": None,
        "agreement": None,
        "independent": {"violations": meat, "violation_rate": meat / n if n else None},
        "refusals": {"count": refusals, "rate": refusals / n if n else 0.0},
        "repetitive": {"count": repetitive, "rate": repetitive / n if n else 0.0},
        "distinct_2": H.distinct_n(responses, 2),
        "response_tokens_mean": sum(lengths) / n if n else None,
        "truncated": sum(r == "length" for r in finish_reasons),
    }
    if scores is not None:
        judged = [s for s in scores if s is not None]
        violations = sum(s < threshold for s in judged)
        summary["judge"] = {
            "violations": violations,
            "passes": len(judged) - violations,
            "failures": n - len(judged),
            "violation_rate": violations / len(judged) if judged else None,
            "mean_score": sum(judged) / len(judged) if judged else None,
            "histogram": histogram(judged, bins),
        }
    if rule_scores is not None:
        rule_bad = [s < threshold for s in rule_scores]
        summary["rule"] = {"violations": sum(rule_bad), "violation_rate": sum(rule_bad) / n if n else None}
        if scores is not None:
            both = [(s < threshold) == r for s, r in zip(scores, rule_bad) if s is not None]
            summary["agreement"] = sum(both) / len(both) if both else None
    return summary


def summarize_models(models: Sequence[dict[str, Any]], answers_by_label: dict[str, dict[str, list]],
                     judgements: dict[str, list] | None, rule_scores: dict[str, list[float] | None],
                     threshold: float, bins: int = 10) -> list[dict[str, Any]]:
    """The report's ``models``: for each of ``models`` (dicts with at least ``label``; the first is the base)
    that dict with its `model_summary`, and for every other model its guards against the base
    (`rayalign.evaluation.heldout.guards`). ``judgements`` (per label, one per prompt) is None without a judge."""
    out = []
    for m in models:
        a = answers_by_label[m["label"]]
        scores = None if judgements is None else [j.score for j in judgements[m["label"]]]
        out.append({**m, **model_summary(a["responses"], scores, rule_scores[m["label"]], a["tokens"],
                                         a["finish_reasons"], threshold, bins)})
    for m in out[1:]:
        m["guards"] = H.guards(out[0], m)
    return out


def score_by_rule(rule_name: str, prompts: Sequence[str],
                  responses: dict[str, list[str]]) -> dict[str, list[float] | None]:
    """Per model label, the rule ``rule_name``'s score of each response (None per label when there is no rule)."""
    from rayalign.judge.rules import RULES

    rule = RULES[rule_name] if rule_name else None
    return {label: [rule(p, r) for p, r in zip(prompts, rs)] if rule else None for label, rs in responses.items()}


def heldout_report(prompts: Sequence[str], held: Any, answers_by_label: dict[str, dict[str, list]],
                   judgements: dict[str, list] | None, threshold: float,
                   judge: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report a training job ends with: ``answers_by_label`` (`answers`, the base's first) to the held-out
    ``prompts`` as `summarize_models` sums them up, scored by ``held.rule`` (a `rayalign.config.HeldOutConfig`)
    and, when ``judgements`` are given, by the judge (``judge`` describes it); and ``held.examples``
    side-by-side samples per aligned model. Raises RuntimeError if its counts do not add up."""
    from rayalign.config import to_dict

    responses = {label: a["responses"] for label, a in answers_by_label.items()}
    rule_scores = score_by_rule(held.rule, prompts, responses)
    labels = list(answers_by_label)
    report = {
        "data": {"source": held.prompts, "prompts": len(prompts)},
        "judge": judge,
        "rule": held.rule or None,
        "sampling": to_dict(held.sampling),
        "models": summarize_models([{"label": label} for label in labels], answers_by_label, judgements,
                                   rule_scores, threshold),
        "samples": [s for label in labels[1:]
                    for s in side_by_side(prompts, labels[0], label, responses, judgements, rule_scores, None,
                                          threshold, held.examples)],
    }
    problems = check_report(report)
    if problems:
        raise RuntimeError("inconsistent held-out report: " + "; ".join(problems))
    return report


def uninformative_judge(report: dict[str, Any]) -> list[str]:
    """Why the report's judge figures carry no information, if they do not: one model's scores all in one bin
    of the histogram, or the first answer picked in more than 90% of the pairwise comparisons."""
    notes = []
    for m in report["models"]:
        j = m["judge"]
        if j and j["histogram"]["counts"] and max(j["histogram"]["counts"]) == sum(j["histogram"]["counts"]) > 1:
            edges, i = j["histogram"]["edges"], j["histogram"]["counts"].index(max(j["histogram"]["counts"]))
            notes.append(f"the judge put every score of {m['label']} in one bin ({edges[i]:.2f}-{edges[i + 1]:.2f}): "
                         "its violation figures for that model carry no information")
    for p in report.get("pairwise", ()):
        if p["first_position_rate"] is not None and p["first_position_rate"] > 0.9:
            notes.append(f"the judge picked the first answer in {p['first_position_rate']:.0%} of the comparisons "
                         f"of {p['model']} and {p['baseline']}: its win rate carries no information")
    return notes


def largest_gaps(base_scores: Sequence[float | None], scores: Sequence[float | None],
                 base_responses: Sequence[str], responses: Sequence[str],
                 base_rule: Sequence[float] | None = None, rule: Sequence[float] | None = None,
                 top: int = 5) -> list[int]:
    """Indices of the ``top`` prompts where two models differ most: by |score gap| (0 when either judgement
    failed), then by whether the rule disagrees. Prompts with identical responses are left out."""
    def key(i: int) -> tuple[float, int]:
        a, b = base_scores[i], scores[i]
        gap = abs(a - b) if a is not None and b is not None else 0.0
        rule_differs = int(base_rule is not None and rule is not None and base_rule[i] != rule[i])
        return gap, rule_differs

    differing = [i for i in range(len(scores)) if responses[i].strip() != base_responses[i].strip()]
    return sorted(differing, key=key, reverse=True)[:top]


def side_by_side(prompts: Sequence[str], baseline: str, label: str, responses: dict[str, list[str]],
                 judgements: dict[str, list] | None, rule_scores: dict[str, list[float] | None],
                 outcomes: Sequence[str] | None, threshold: float, top: int) -> list[dict[str, Any]]:
    """The report's ``samples`` for one model: the ``top`` prompts where ``label``'s answers differ most from
    ``baseline``'s (`largest_gaps`), both answers beside each other with their scores and the pairwise outcome
    (None: not compared). ``responses``, ``judgements`` (None: no judge) and ``rule_scores`` are per model label,
    each one entry per prompt."""
    scores = {name: [None] * len(prompts) if judgements is None else [j.score for j in judgements[name]]
              for name in (baseline, label)}
    base_scores, model_scores = scores[baseline], scores[label]

    def side(name: str, i: int) -> dict[str, Any]:
        rule = rule_scores[name]
        return {"response": responses[name][i], "score": scores[name][i],
                "judge_raw": "" if judgements is None else judgements[name][i].raw[:200],
                "rule_violation": None if rule is None else rule[i] < threshold,
                "meat_word": H.mentions_meat(responses[name][i])}

    return [{"model": label, "baseline": baseline, "prompt": prompts[i],
             "pairwise": None if outcomes is None else outcomes[i],
             "gap": None if model_scores[i] is None or base_scores[i] is None else model_scores[i] - base_scores[i],
             "base": side(baseline, i), "candidate": side(label, i)}
            for i in largest_gaps(base_scores, model_scores, responses[baseline], responses[label],
                                  rule_scores[baseline], rule_scores[label], top)]


def write_samples(path: Path, prompts: Sequence[str], answers_by_label: dict[str, dict[str, list]],
                  judgements: dict[str, list] | None, rule_scores: dict[str, list[float] | None]) -> None:
    """``samples.jsonl``: one line per (prompt, model) with the response, its judgement and its rule score;
    ``answers_by_label`` (`answers`), ``judgements`` (None: no judge) and ``rule_scores`` are per model label,
    each one entry per prompt."""
    with open(path, "w") as f:
        for i, prompt in enumerate(prompts):
            for label, a in answers_by_label.items():
                j, rule = None if judgements is None else judgements[label][i], rule_scores[label]
                f.write(json.dumps({"prompt": prompt, "model": label, "response": a["responses"][i],
                                    "tokens": a["tokens"][i], "finish_reason": a["finish_reasons"][i],
                                    "score": j and j.score, "judge_raw": j and j.raw, "judge_error": j and j.error,
                                    "rule_score": None if rule is None else rule[i]}) + "\n")


def check_report(report: dict[str, Any]) -> list[str]:
    """Counts that must add up; returns the problems found (empty: consistent)."""
    problems = []
    for m in report["models"]:
        j, n = m["judge"], m["prompts"]
        if j is not None and j["violations"] + j["passes"] + j["failures"] != n:
            problems.append(f"{m['label']}: violations {j['violations']} + passes {j['passes']} + failures "
                            f"{j['failures']} != prompts {n}")
        if j is not None and sum(j["histogram"]["counts"]) != j["violations"] + j["passes"]:
            problems.append(f"{m['label']}: the histogram holds {sum(j['histogram']['counts'])} scores, "
                            f"expected {j['violations'] + j['passes']}")
        for name in ("rule", "independent"):
            if m[name] is not None and not 0 <= m[name]["violations"] <= n:
                problems.append(f"{m['label']}: {name} violations {m[name]['violations']} outside [0, {n}]")
        for name in ("refusals", "repetitive"):
            if not 0 <= m[name]["count"] <= n:
                problems.append(f"{m['label']}: {name} {m[name]['count']} outside [0, {n}]")
    prompts = {m["label"]: m["prompts"] for m in report["models"]}
    for p in report.get("pairwise", ()):
        total = p["wins"] + p["ties"] + p["losses"] + p["failed"]
        if total != prompts.get(p["model"]):
            problems.append(f"{p['model']} vs {p['baseline']}: wins + ties + losses + failed = {total}, "
                            f"expected {prompts.get(p['model'])}")
        if p["inconsistent"] + p["identical"] != p["ties"]:
            problems.append(f"{p['model']} vs {p['baseline']}: inconsistent + identical != ties")
    return problems


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report's numbers as MLflow metrics ``<model>/<name>`` (undefined rates are left out)."""
    metrics: dict[str, Any] = {}
    for m in report["models"]:
        j, r, g = m["judge"] or {}, m["rule"] or {}, m.get("guards") or {}
        for key, value in (("violations", j.get("violations")), ("judge_failures", j.get("failures")),
                           ("violation_rate", j.get("violation_rate")), ("mean_score", j.get("mean_score")),
                           ("rule_violations", r.get("violations")), ("rule_violation_rate", r.get("violation_rate")),
                           ("meat_word_rate", m["independent"]["violation_rate"]),
                           ("refusal_rate", m["refusals"]["rate"]), ("repetitive_rate", m["repetitive"]["rate"]),
                           ("distinct_2", m["distinct_2"]),
                           ("response_tokens_mean", m["response_tokens_mean"]),
                           ("guards/length_ratio", g.get("length_ratio")),
                           ("guards/distinct_2_ratio", g.get("distinct_2_ratio")),
                           ("guards/held", None if not g else float(g["held"]))):
            metrics[f"{m['label']}/{key}"] = value
    for p in report.get("pairwise", ()):
        for key in ("wins", "ties", "losses", "failed", "win_rate"):
            metrics[f"{p['model']}/pairwise_{key}"] = p[key]
    return {k: v for k, v in metrics.items() if v is not None}


def text_table(report: dict[str, Any], kl: float | None = None) -> str:
    """The held-out result for a terminal: one row per model (violations by the judge, by the rule and by the
    independent term list, mean judge score, length, distinct-2, refusals, repetitive answers), then per aligned
    model its drops against the base and its guards, then any note that the judge's figures carry no information."""
    rule = report.get("rule") or "rule"
    head = (f"{'model':<14} {'judge viol.':>11} {rule[:12] + ' viol.':>18} {'meat words':>10} {'mean score':>10} "
            f"{'tokens':>7} {'distinct-2':>10} {'refusals':>8} {'repeats':>7}")
    lines = [head]
    for m in report["models"]:
        j, r = m["judge"] or {}, m["rule"] or {}
        lines.append(f"{m['label'][:14]:<14} {_pct(j.get('violation_rate')):>11} {_pct(r.get('violation_rate')):>18} "
                     f"{_pct(m['independent']['violation_rate']):>10} {_num(j.get('mean_score')):>10} "
                     f"{_num(m['response_tokens_mean'], 1):>7} {m['distinct_2']:>10.3f} "
                     f"{_pct(m['refusals']['rate']):>8} {_pct(m['repetitive']['rate']):>7}")
    base = report["models"][0]
    for m in report["models"][1:]:
        drops = []
        for name, b, a in (("judge", (base["judge"] or {}).get("violation_rate"), (m["judge"] or {}).get("violation_rate")),
                           (rule, (base["rule"] or {}).get("violation_rate"), (m["rule"] or {}).get("violation_rate")),
                           ("term list", base["independent"]["violation_rate"], m["independent"]["violation_rate"])):
            if b is not None or a is not None:
                drops.append(f"{_change(H.relative_drop(b, a))} by the {name}")
        lines.append(f"{m['label']} vs {base['label']}: violations " + ", ".join(drops))
        g = m["guards"]
        ok = {True: "ok", False: "FAILED"}
        lines.append(
            f"guards: length {_num(g['length_ratio'], 2)}x the base's (>= {H.LENGTH_RATIO_MIN}) {ok[g['passed']['length']]}, "
            f"distinct-2 {_num(g['distinct_2_ratio'], 2)}x (>= {H.DISTINCT_2_RATIO_MIN}) {ok[g['passed']['distinct_2']]}, "
            f"refusals {_pct(g['refusal_rate'])} (<= {H.REFUSAL_RATE_MAX:.0%}) {ok[g['passed']['refusals']]}, "
            f"repeats {_pct(g['repetitive_rate'])} (<= {H.REPETITIVE_RATE_MAX:.0%}) {ok[g['passed']['repetitive']]}"
            + (f"; final KL {kl:.3f}" if kl is not None else ""))
    lines += [f"note: {n}" for n in uninformative_judge(report)]
    return "\n".join(lines)


def text_examples(samples: Sequence[dict[str, Any]], width: int = 300) -> str:
    """Side-by-side samples for a terminal: the prompt, then each model's answer (cut to ``width`` characters)."""
    def tag(side: dict[str, Any]) -> str:
        marks = [f"score {side['score']:.2f}"] if side["score"] is not None else []
        marks += ["rule: violation"] if side["rule_violation"] else []
        marks += ["meat word"] if side.get("meat_word") else []
        return f" ({', '.join(marks)})" if marks else ""

    out = []
    for s in samples:
        out += [f">>> {s['prompt'].strip()}",
                f"[{s['baseline']}]{tag(s['base'])} {' '.join(s['base']['response'].split())[:width]}",
                f"[{s['model']}]{tag(s['candidate'])} {' '.join(s['candidate']['response'].split())[:width]}", ""]
    return "\n".join(out).rstrip() or "(none: the two models gave the same answers)"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _change(drop: float | None) -> str:
    return "n/a (the base has none)" if drop is None else f"{drop:.0%} fewer" if drop >= 0 else f"{-drop:.0%} more"


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def headline_table(report: dict[str, Any]) -> str:
    """Markdown: one row per model."""
    rule = report.get("rule") or "rule"
    lines = [f"| model | kind | judge violations | judge rate | {rule} violations | {rule} rate | judge failures "
             "| mean score | mean tokens | meat words (independent) | distinct-2 | refusals | repetitive |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in report["models"]:
        j, r = m["judge"], m["rule"]
        judged = j["violations"] + j["passes"]
        rule_cells = (f"{r['violations']} / {m['prompts']}", _pct(r["violation_rate"])) if r else ("-", "-")
        lines.append(f"| {_cell(m['label'])} | {m['kind']} | {j['violations']} / {judged} | "
                     f"{_pct(j['violation_rate'])} | {rule_cells[0]} | {rule_cells[1]} | {j['failures']} | "
                     f"{_num(j['mean_score'])} | {_num(m['response_tokens_mean'], 1)} | "
                     f"{m['independent']['violations']} / {m['prompts']} | {m['distinct_2']:.3f} | "
                     f"{_pct(m['refusals']['rate'])} | {_pct(m['repetitive']['rate'])} |")
    return "\n".join(lines)


def win_rate_table(report: dict[str, Any]) -> str:
    """Markdown: one row per aligned model against the base."""
    lines = ["| model vs base | wins | ties (position-inconsistent, identical) | losses | failed | win rate "
             "| judge picked first |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for p in report["pairwise"]:
        lines.append(f"| {_cell(p['model'])} vs {_cell(p['baseline'])} | {p['wins']} | {p['ties']} "
                     f"({p['inconsistent']}, {p['identical']}) | {p['losses']} | {p['failed']} | "
                     f"{_pct(p['win_rate'])} | {_pct(p['first_position_rate'])} |")
    return "\n".join(lines)


def distribution_table(report: dict[str, Any]) -> str:
    """Markdown: judge score counts per bin, one column per model."""
    models = report["models"]
    edges = models[0]["judge"]["histogram"]["edges"]
    lines = ["| score | " + " | ".join(_cell(m["label"]) for m in models) + " |",
             "| --- |" + " --- |" * len(models)]
    for i in range(len(edges) - 1):
        counts = " | ".join(str(m["judge"]["histogram"]["counts"][i]) for m in models)
        lines.append(f"| {edges[i]:.2f}-{edges[i + 1]:.2f} | {counts} |")
    return "\n".join(lines)


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())


def _side(name: str, side: dict[str, Any]) -> str:
    verdict = {None: "", True: ", rule: violation", False: ", rule: ok"}[side.get("rule_violation")]
    return f"**{_cell(name)}** (score {_num(side['score'], 2)}{verdict})\n\n{_quote(side['response'])}"


def render_markdown(report: dict[str, Any], images: Sequence[str] = ()) -> str:
    """The whole report as markdown: setup, headline, win rates, score distribution, side-by-side samples."""
    judge, data = report["judge"], report["data"]
    out = [
        "# Evaluation report", "",
        f"{data['prompts']} held-out prompts from `{data['source']}`; judge `{judge['model']}` "
        f"({judge['backend']}, {judge['mode']} mode), rubric `{judge['rubric']}`: a score below "
        f"{judge['threshold']} is a violation. Second, non-LLM estimate: rule `{report.get('rule') or 'none'}`. "
        f"Sampling: temperature {report['sampling']['temperature']}, seed {report['sampling']['seed']}, "
        f"at most {report['sampling']['max_new_tokens']} new tokens.",
        "",
        "Judge violation rates are over the judged responses; failed judgements are counted apart, never as "
        "violations.", "",
        "## Headline", "", headline_table(report), "",
    ]
    guarded = [m for m in report["models"] if m.get("guards")]
    if guarded:
        out += ["Guards against the base (see `rayalign/evaluation/heldout.py`): mean length at least "
                f"{H.LENGTH_RATIO_MIN:.0%} of the base's, distinct-2 at least {H.DISTINCT_2_RATIO_MIN:.0%} of the "
                f"base's, at most {H.REFUSAL_RATE_MAX:.0%} empty or refusal-like answers, at most "
                f"{H.REPETITIVE_RATE_MAX:.0%} answers looping on one phrase (own distinct-2 below "
                f"{H.REPETITIVE_DISTINCT_2}).", ""]
        for m in guarded:
            g = m["guards"]
            failed = [k for k, ok in g["passed"].items() if not ok]
            out.append(f"- {_cell(m['label'])}: length {_num(g['length_ratio'], 2)}x, distinct-2 "
                       f"{_num(g['distinct_2_ratio'], 2)}x, refusals {_pct(g['refusal_rate'])}, repetitive "
                       f"{_pct(g['repetitive_rate'])}: "
                       + ("held" if g["held"] else "FAILED (" + ", ".join(failed) + ")"))
        out.append("")
    out += [f"**Note:** {n}." for n in uninformative_judge(report)] + [""] * bool(uninformative_judge(report))
    if report["pairwise"]:
        out += ["## Win rate against the base", "",
                "Each pair is judged in both orders: a win needs the judge to prefer the model's answer in both "
                "positions, a loss the base's; anything else is a tie (counted half).", "",
                win_rate_table(report), ""]
    out += ["## Judge score distribution", "", distribution_table(report), ""]
    out += [f"![{name}]({name})" for name in images]
    if report["samples"]:
        out += ["", "## Side by side, where the models differ most", ""]
        for k, s in enumerate(report["samples"], 1):
            gap = "n/a" if s["gap"] is None else f"{s['gap']:.2f}"
            out += [f"### {k}. {_cell(s['model'])} vs {_cell(s['baseline'])} (score gap {gap}, pairwise: "
                    f"{s['pairwise']})", "", _quote(s["prompt"]).replace("> ", "> **prompt:** ", 1), "",
                    _side(s["baseline"], s["base"]), "", _side(s["model"], s["candidate"]), ""]
    return "\n".join(out).rstrip() + "\n"


def plot(report: dict[str, Any], out: Path) -> list[str]:
    """Write score_histograms.png (one panel per model) and violations.png (judge vs rule per model) to ``out``;
    returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, threshold = report["models"], report["judge"]["threshold"]
    fig, axes = plt.subplots(1, len(models), figsize=(3.5 * len(models), 3), sharey=True, squeeze=False)
    for ax, m in zip(axes[0], models):
        h = m["judge"]["histogram"]
        ax.stairs(h["counts"], h["edges"], fill=True, alpha=0.7)
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
        ax.set(title=m["label"], xlabel="judge score")
    axes[0][0].set_ylabel("responses")
    fig.tight_layout()
    fig.savefig(out / "score_histograms.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(1.6 * len(models) + 2.5, 3.5))
    x = range(len(models))
    judge = [m["judge"]["violation_rate"] or 0.0 for m in models]
    rule = [(m["rule"] or {}).get("violation_rate") or 0.0 for m in models]
    bars = ax.bar([i - 0.2 for i in x], judge, width=0.4, label="judge")
    for b, m in zip(bars, models):
        j = m["judge"]
        ax.annotate(f"{j['violations']}/{j['violations'] + j['passes']}", (b.get_x() + 0.2, b.get_height()),
                    ha="center", va="bottom", fontsize=8)
    if report["rule"]:
        bars = ax.bar([i + 0.2 for i in x], rule, width=0.4, label=report["rule"])
        for b, m in zip(bars, models):
            ax.annotate(f"{m['rule']['violations']}/{m['prompts']}", (b.get_x() + 0.2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [m["label"] for m in models], rotation=15)
    ax.set(ylabel="violation rate", ylim=(0, 1.1), title="violations: judge vs rule")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "violations.png", dpi=100)
    plt.close(fig)
    return ["score_histograms.png", "violations.png"]
