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


def histogram(values: Sequence[float], bins: int, lo: float = 0.0, hi: float = 1.0) -> dict[str, list]:
    """Counts of ``values`` in ``bins`` equal bins over [lo, hi] (the last bin includes ``hi``)."""
    width = (hi - lo) / bins
    counts = [0] * bins
    for v in values:
        if not lo <= v <= hi:
            raise ValueError(f"value {v} outside [{lo}, {hi}]")
        counts[min(int((v - lo) / width), bins - 1)] += 1
    return {"edges": [round(lo + i * width, 6) for i in range(bins + 1)], "counts": counts}


def model_summary(scores: Sequence[float | None], rule_scores: Sequence[float] | None, lengths: Sequence[int],
                  finish_reasons: Sequence[str], threshold: float, bins: int = 10) -> dict[str, Any]:
    """One model's numbers from its per-prompt judge scores (None: judging failed), rule scores (None: no rule),
    response lengths in tokens and finish reasons. A score below ``threshold`` is a violation."""
    n = len(scores)
    judged = [s for s in scores if s is not None]
    violations = sum(s < threshold for s in judged)
    summary: dict[str, Any] = {
        "prompts": n,
        "judge": {
            "violations": violations,
            "passes": len(judged) - violations,
            "failures": n - len(judged),
            "violation_rate": violations / len(judged) if judged else None,
            "mean_score": sum(judged) / len(judged) if judged else None,
            "histogram": histogram(judged, bins),
        },
        "rule": None,
        "agreement": None,
        "response_tokens_mean": sum(lengths) / n if n else None,
        "truncated": sum(r == "length" for r in finish_reasons),
    }
    if rule_scores is not None:
        rule_bad = [s < threshold for s in rule_scores]
        summary["rule"] = {"violations": sum(rule_bad), "violation_rate": sum(rule_bad) / n if n else None}
        both = [(s < threshold) == r for s, r in zip(scores, rule_bad) if s is not None]
        summary["agreement"] = sum(both) / len(both) if both else None
    return summary


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
                 judgements: dict[str, list], rule_scores: dict[str, list[float] | None],
                 outcomes: Sequence[str], threshold: float, top: int) -> list[dict[str, Any]]:
    """The report's ``samples`` for one model: the ``top`` prompts where ``label``'s answers differ most from
    ``baseline``'s (`largest_gaps`), both answers beside each other with their scores and the pairwise outcome.
    ``responses``, ``judgements`` and ``rule_scores`` are per model label, each one entry per prompt."""
    base_scores = [j.score for j in judgements[baseline]]
    scores = [j.score for j in judgements[label]]

    def side(name: str, i: int) -> dict[str, Any]:
        rule = rule_scores[name]
        return {"response": responses[name][i], "score": judgements[name][i].score,
                "judge_raw": judgements[name][i].raw[:200],
                "rule_violation": None if rule is None else rule[i] < threshold}

    return [{"model": label, "baseline": baseline, "prompt": prompts[i], "pairwise": outcomes[i],
             "gap": None if scores[i] is None or base_scores[i] is None else scores[i] - base_scores[i],
             "base": side(baseline, i), "candidate": side(label, i)}
            for i in largest_gaps(base_scores, scores, responses[baseline], responses[label],
                                  rule_scores[baseline], rule_scores[label], top)]


def write_samples(path: Path, prompts: Sequence[str], rollouts: dict[str, list], judgements: dict[str, list],
                  rule_scores: dict[str, list[float] | None]) -> None:
    """``samples.jsonl``: one line per (prompt, model) with the response, its judgement and its rule score;
    ``rollouts``, ``judgements`` and ``rule_scores`` are per model label, each one entry per prompt."""
    with open(path, "w") as f:
        for i, prompt in enumerate(prompts):
            for label, rs in rollouts.items():
                j, rule = judgements[label][i], rule_scores[label]
                f.write(json.dumps({"prompt": prompt, "model": label, "response": rs[i].response,
                                    "tokens": len(rs[i].response_token_ids), "finish_reason": rs[i].finish_reason,
                                    "score": j.score, "judge_raw": j.raw, "judge_error": j.error,
                                    "rule_score": None if rule is None else rule[i]}) + "\n")


def check_report(report: dict[str, Any]) -> list[str]:
    """Counts that must add up; returns the problems found (empty: consistent)."""
    problems = []
    for m in report["models"]:
        j, n = m["judge"], m["prompts"]
        if j["violations"] + j["passes"] + j["failures"] != n:
            problems.append(f"{m['label']}: violations {j['violations']} + passes {j['passes']} + failures "
                            f"{j['failures']} != prompts {n}")
        if sum(j["histogram"]["counts"]) != j["violations"] + j["passes"]:
            problems.append(f"{m['label']}: the histogram holds {sum(j['histogram']['counts'])} scores, "
                            f"expected {j['violations'] + j['passes']}")
        if m["rule"] is not None and not 0 <= m["rule"]["violations"] <= n:
            problems.append(f"{m['label']}: rule violations {m['rule']['violations']} outside [0, {n}]")
    prompts = {m["label"]: m["prompts"] for m in report["models"]}
    for p in report["pairwise"]:
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
        j, r = m["judge"], m["rule"] or {}
        for key, value in (("violations", j["violations"]), ("judge_failures", j["failures"]),
                           ("violation_rate", j["violation_rate"]), ("mean_score", j["mean_score"]),
                           ("rule_violations", r.get("violations")), ("rule_violation_rate", r.get("violation_rate")),
                           ("response_tokens_mean", m["response_tokens_mean"])):
            metrics[f"{m['label']}/{key}"] = value
    for p in report["pairwise"]:
        for key in ("wins", "ties", "losses", "failed", "win_rate"):
            metrics[f"{p['model']}/pairwise_{key}"] = p[key]
    return {k: v for k, v in metrics.items() if v is not None}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def headline_table(report: dict[str, Any]) -> str:
    """Markdown: one row per model."""
    rule = report.get("rule") or "rule"
    lines = [f"| model | kind | judge violations | judge rate | {rule} violations | {rule} rate | judge failures "
             "| mean score | mean tokens |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in report["models"]:
        j, r = m["judge"], m["rule"]
        judged = j["violations"] + j["passes"]
        rule_cells = (f"{r['violations']} / {m['prompts']}", _pct(r["violation_rate"])) if r else ("-", "-")
        lines.append(f"| {_cell(m['label'])} | {m['kind']} | {j['violations']} / {judged} | "
                     f"{_pct(j['violation_rate'])} | {rule_cells[0]} | {rule_cells[1]} | {j['failures']} | "
                     f"{_num(j['mean_score'])} | {_num(m['response_tokens_mean'], 1)} |")
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
