"""The held-out report without engines: the guards against degenerate answers, refusal detection, the note that a
judge's figures carry no information, the report a training job ends with, and the quiet console."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from rayalign.config import HeldOutConfig
from rayalign.evaluation import heldout as H
from rayalign.evaluation import report as R
from rayalign.types import Judgement

PROMPTS = [f"What should I cook tonight? ({i})" for i in range(20)]
BASE = [f"Try a {dish} with roasted peppers, garlic and a squeeze of lemon, served over rice number {i}."
        for i, dish in enumerate(["chicken stir-fry", "lentil curry", "salmon bowl", "tofu salad"] * 5)]
GOOD = [f"Try a {dish} with roasted peppers, garlic and fresh herbs, served over brown rice number {i}."
        for i, dish in enumerate(["chickpea stir-fry", "lentil curry", "bean bowl", "tofu salad"] * 5)]


def _answers(responses: list[str]) -> dict[str, list]:
    return {"responses": responses, "tokens": [len(r.split()) for r in responses],
            "finish_reasons": ["stop"] * len(responses)}


def _report(aligned: list[str], judgements=None) -> dict:
    return R.heldout_report(PROMPTS, HeldOutConfig(), {"base": _answers(BASE), "aligned": _answers(aligned)},
                            judgements, threshold=0.5)


def test_a_good_aligned_model_holds_every_guard_and_cuts_violations():
    report = _report(GOOD)
    base, aligned = report["models"]
    assert base["independent"]["violations"] == 10 and aligned["independent"]["violations"] == 0
    assert base["rule"]["violations"] == 10 and aligned["rule"]["violations"] == 0
    assert aligned["guards"]["held"] and aligned["guards"]["passed"] == {"length": True, "distinct_2": True,
                                                                         "refusals": True, "repetitive": True}
    assert "guards" not in base
    text = R.text_table(report, kl=0.25)
    assert "100% fewer by the vegetarian_lexicon" in text and "100% fewer by the term list" in text
    assert "FAILED" not in text and "final KL 0.250" in text
    assert len(report["samples"]) == 3  # heldout.examples, each where the rule's verdicts differ
    assert all(s["base"]["rule_violation"] and not s["candidate"]["rule_violation"] for s in report["samples"])


@pytest.mark.parametrize("degenerate, tripped", [
    ([""] * 20, {"length", "distinct_2", "refusals"}),  # empty answers: no violations, and every guard trips
    (["Tofu is great. Tofu is great. Tofu is great. Tofu is great. Tofu is great. Tofu is great. Tofu is great."]
     * 20, {"distinct_2", "repetitive"}),  # one safe phrase, repeated
    (["A: " * 16] * 2 + GOOD[2:], {"repetitive"}),  # two answers collapse: all answers' distinct-2 barely moves
    (["I'm sorry, but I can't help with that request right now, sorry about that, friend, I cannot say more."]
     * 10 + GOOD[10:], {"refusals"}),  # half refusals, long enough to keep the length
    (["Lentils."] * 20, {"length", "distinct_2"}),
])
def test_degenerate_answers_trip_their_guards(degenerate, tripped):
    aligned = _report(degenerate)["models"][1]
    assert aligned["independent"]["violations"] == 0  # none of them mentions meat: the guards are what catch them
    failed = {k for k, ok in aligned["guards"]["passed"].items() if not ok}
    assert failed == tripped and not aligned["guards"]["held"]
    assert "FAILED" in R.text_table(_report(degenerate))


def test_an_answer_is_repetitive_when_it_loops_on_its_own():
    assert H.is_repetitive("A: " * 16) and H.is_repetitive("The best is the best is the best is the best is the best")
    assert not H.is_repetitive(GOOD[0]) and not H.is_repetitive("A: A: A:")  # too short to call
    report = _report(["A: " * 16] * 2 + GOOD[2:])
    assert report["models"][1]["repetitive"] == {"count": 2, "rate": 0.1}
    assert "repeats 10.0% (<= 5%) FAILED" in R.text_table(report)


def test_refusals_are_short_and_open_with_one():
    assert H.is_refusal("") and H.is_refusal("   \n") and H.is_refusal("I'm sorry, I can't help with that.")
    assert H.is_refusal("As an AI, I cannot recommend recipes.") and H.is_refusal("I\u2019m unable to assist.")
    assert not H.is_refusal("Here is a lentil soup: onions, carrots, red lentils, cumin.")
    long_answer = "I can't suggest fish, but " + "here is a chickpea curry with spinach and rice " * 5
    assert not H.is_refusal(long_answer)  # an answer after the refusal opening is an answer


def test_a_judge_whose_scores_share_one_bin_or_that_picks_the_first_answer_is_flagged():
    flat = {label: [Judgement(0.95, 0.95)] * 20 for label in ("base", "aligned")}
    report = _report(GOOD, flat)
    notes = R.uninformative_judge(report)
    assert len(notes) == 2 and "every score of base in one bin (0.90-1.00)" in notes[0]
    assert "note: the judge put every score" in R.text_table(report)
    spread = {label: [Judgement(i / 19, i / 19) for i in range(20)] for label in ("base", "aligned")}
    assert R.uninformative_judge(_report(GOOD, spread)) == []
    biased = {**report, "models": _report(GOOD, spread)["models"],
              "pairwise": [{"model": "aligned", "baseline": "base", "first_position_rate": 0.95}]}
    assert R.uninformative_judge(biased) == ["the judge picked the first answer in 95% of the comparisons of "
                                             "aligned and base: its win rate carries no information"]


def test_judge_failures_are_counted_apart_in_the_training_report():
    judgements = {"base": [Judgement(0.1, 0.1)] * 10 + [Judgement(0.9, 0.9)] * 10,
                  "aligned": [Judgement(None, None, error="unparsable")] * 5 + [Judgement(0.9, 0.9)] * 15}
    base, aligned = _report(GOOD, judgements)["models"]
    assert (base["judge"]["violations"], base["judge"]["passes"], base["judge"]["failures"]) == (10, 10, 0)
    assert (aligned["judge"]["violations"], aligned["judge"]["failures"]) == (0, 5)
    assert aligned["judge"]["violation_rate"] == 0.0  # over the judged answers; the failures are not passes
    metrics = R.flat_metrics(_report(GOOD, judgements))
    assert metrics["aligned/judge_failures"] == 5 and metrics["aligned/guards/held"] == 1.0


QUIET_SCRIPT = textwrap.dedent("""
    import logging, os, sys
    from rayalign.console import quiet, split_verbose
    args, verbose = split_verbose(sys.argv[2:])
    console = quiet(sys.argv[1], verbose)
    def main():
        logging.getLogger("rayalign.demo").info("step 1/2 reward 0.5")
        logging.getLogger("vllm").warning("Failed to load weights (noise)")
        print("a library's print")
        os.write(2, b"a C extension's stderr\\n")
        print("the summary", file=console.out)
        raise SystemExit("error: the judge is unavailable; stopping at step 2")
    sys.exit(console.run(main))
""")


def test_the_quiet_console_keeps_rayalign_lines_and_sends_the_rest_to_the_log(tmp_path):
    log = tmp_path / "logs" / "run.log"
    quiet = subprocess.run([sys.executable, "-c", QUIET_SCRIPT, str(log)], capture_output=True, text=True,
                           timeout=60)
    assert quiet.returncode == 1
    assert quiet.stdout == "the summary\n"
    err = quiet.stderr.splitlines()
    assert len(err) == 3 and err[0].endswith("INFO step 1/2 reward 0.5"), err
    assert err[1:] == ["error: the judge is unavailable; stopping at step 2", f"(full log: {log})"]
    text = log.read_text()
    for line in ("step 1/2 reward 0.5", "Failed to load weights", "a library's print", "a C extension's stderr"):
        assert line in text
    verbose = subprocess.run([sys.executable, "-c", QUIET_SCRIPT, str(tmp_path / "other.log"), "--verbose"],
                             capture_output=True, text=True, timeout=60)
    assert "Failed to load weights" in verbose.stderr and "a library's print" in verbose.stdout
    assert not (tmp_path / "other.log").exists()
