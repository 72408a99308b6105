"""The learner for real (Ray Train worker, DeepSpeed on CPU, SmolLM2 with LoRA): the single-pass training step sees
exactly the policy and reference logprobs that the separate no-grad pass would have computed."""

from __future__ import annotations

import pytest
import torch

from rayalign.config import AlgorithmConfig, LearnerConfig, LoraConfig
from rayalign.types import Rollout

pytestmark = pytest.mark.slow

TEXTS = [("What can I grill for friends?", "Halloumi skewers with peppers and a lemon yoghurt dip."),
         ("A quick lunch idea?", "A chickpea salad with cucumber, feta and mint."),
         ("How do I thicken a curry?", "Stir in a spoon of ground almonds or simmer it uncovered.")]


def _rollouts(model_path: str) -> list[Rollout]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    out = []
    for prompt, response in TEXTS:
        p = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                    tokenize=True, return_dict=True)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"]
        out.append(Rollout(prompt, response, tuple(p), tuple(r), tuple([-1.0] * len(r)), "stop", 0, 0))
    return out


def test_single_pass_step_sees_what_the_separate_pass_sees(local_ray, model_path, tmp_path):
    import ray

    from rayalign.learner.batch import minibatch_plan, pad_rollouts
    from rayalign.learner.group import Learner

    algo = AlgorithmConfig(name="grpo", kl_in="loss", kl_estimator="k3", minibatch_size=4)  # k3 > 0 once apart
    learner = Learner(model_path, learner=LearnerConfig(micro_batch_size=2, lr=1e-3), lora=LoraConfig(),
                      algorithm=algo, storage_path=str(tmp_path), run_name="single-pass", seed=0)
    try:
        learner.setup()
        batch = pad_rollouts(_rollouts(model_path))
        batch["advantages"] = torch.tensor([[1.0], [-1.0], [0.5]]) * batch["response_mask"]
        # 3 rows in a minibatch of 4: one padding row, in the second micro-batch
        plan = minibatch_plan(3, 4, 1, 2, 1, torch.Generator().manual_seed(0))
        assert len(plan) == 1 and -1 in plan[0][0][1] + plan[0][0][0]

        # one ordinary step first, so that the policy differs from the reference
        first = learner.forward(ray.put(batch), 3, 1.0)
        assert torch.equal(first["logprobs"], first["ref_logprobs"])  # LoRA's B starts at 0
        stats, seen = learner.train(ray.put({**batch, "logprobs": first["logprobs"],
                                             "ref_logprobs": first["ref_logprobs"]}), plan, 1.0, 0.05)
        assert seen is None and stats["optimizer_steps"] == 1

        expected = learner.forward(ray.put(batch), 3, 1.0)  # the separate pass, on the updated policy
        stats, seen = learner.train(ray.put(batch), plan, 1.0, 0.05, single_pass=True)
    finally:
        learner.shutdown()

    mask = batch["response_mask"].bool()
    assert (expected["logprobs"] - expected["ref_logprobs"])[mask].abs().max() > 1e-3  # the policy has moved
    for key in ("logprobs", "ref_logprobs"):
        assert seen[key].shape == expected[key].shape
        # train mode vs eval mode, and micro-batches of 2 vs the forward's 4: fp32, equal to 1e-4
        assert torch.allclose(seen[key][mask], expected[key][mask], atol=1e-4), key
    assert stats["clip_frac"] == 0.0 and abs(stats["approx_kl"]) < 1e-6  # ratio 1: old = this pass, detached
    assert stats["kl_loss"] > 0
