"""Write the shipped vegetarian preference sets (rayalign/datasets/vegetarian/pairs.jsonl and kto.jsonl).

On-policy pairs from the embedded SmolLM2 itself, labelled by the vegetarian lexicon rule: every training prompt
is answered ``--samples`` times (temperature ``--temperature``); a prompt with an answer that recommends meat or
fish gets a pair whose rejected side is that answer and whose chosen side is one of its clean answers (on each
side the answer the model itself found most likely per token, so that the two differ in what they recommend
rather than in how garbled a sample came out) -- or, when it has none, a
clean answer written under a steering instruction ("never recommend meat or fish") that is not part of the
stored prompt, so training teaches the unsteered model what the instruction made it say. The KTO set holds the
same answers one per row, labelled good (clean) or bad. The held-out prompts are never used.

    .venv/bin/python scripts/make_vegetarian_pairs.py [--samples 4] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEER = ("You are the food assistant of a vegetarian grocery chain. Never recommend meat, poultry, fish, seafood "
         "or hidden animal ingredients such as gelatin, fish sauce or meat stock; suggest vegetarian options.\n\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--out", default=str(ROOT / "rayalign" / "datasets" / "vegetarian"))
    args = parser.parse_args()

    import ray

    from rayalign.config import EngineConfig, ModelConfig, SamplingConfig
    from rayalign.data.prompts import load_prompts
    from rayalign.judge.rules import vegetarian_lexicon
    from rayalign.models import resolve_model
    from rayalign.rollout.group import RolloutGroup

    prompts = list(load_prompts("builtin:vegetarian/train").prompts)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    group = RolloutGroup(resolve_model("smollm2-135m-instruct"), ModelConfig(), EngineConfig(max_model_len=1024))
    try:
        # unseeded: vLLM's CPU build fails a seeded request whose prefill is split into chunks, as in a batch
        # this large ("CPU Generator does not use offset"); the shipped files, not this run, are the fixed data
        sampling = SamplingConfig(n=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
        answers = group.generate(prompts, sampling)
        by_prompt = [answers[i * args.samples:(i + 1) * args.samples] for i in range(len(prompts))]

        def likeliest(rollouts):
            """The responses, most likely per token first (the engine's own logprobs)."""
            ranked = sorted(rollouts, key=lambda r: -sum(r.logprobs) / max(1, len(r.logprobs)))
            return [r.response.strip() for r in ranked
                    if r.response.strip()]

        def clean(rollouts):
            return likeliest([r for r in rollouts if vegetarian_lexicon("", r.response) >= 0.5])

        bad = {i: likeliest([r for r in rs if vegetarian_lexicon("", r.response) < 0.5]) for i, rs in
               enumerate(by_prompt)}
        need_steer = [i for i in range(len(prompts)) if bad[i] and not clean(by_prompt[i])]
        steered = group.generate([STEER + prompts[i] for i in need_steer],
                                 SamplingConfig(n=2, temperature=0.7, max_new_tokens=args.max_new_tokens))
    finally:
        group.shutdown()
        ray.shutdown()
    steered_clean = {i: clean(steered[k * 2:(k + 1) * 2]) for k, i in enumerate(need_steer)}

    pairs, kto = [], []
    for i, prompt in enumerate(prompts):
        good = clean(by_prompt[i]) or steered_clean.get(i, [])
        if good:
            kto.append({"prompt": prompt, "completion": good[0], "label": True})
        if bad[i]:
            kto.append({"prompt": prompt, "completion": bad[i][0], "label": False})
        if good and bad[i]:
            pairs.append({"prompt": prompt, "chosen": good[0], "rejected": bad[i][0]})
    out = Path(args.out)
    for name, rows in (("pairs", pairs), ("kto", kto)):
        with open(out / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    print(json.dumps({"prompts": len(prompts), "with_a_violation": sum(bool(b) for b in bad.values()),
                      "steered": len(need_steer), "pairs": len(pairs), "kto_rows": len(kto)}))


if __name__ == "__main__":
    main()
