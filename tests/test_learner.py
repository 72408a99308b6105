"""The learner for real (Ray Train worker, DeepSpeed on CPU, SmolLM2 with LoRA): the single-pass training step sees
exactly the policy and reference logprobs that the separate no-grad pass would have computed."""

from __future__ import annotations

import pytest
import torch

from rayalign.config import LEARNER_MALLOC_TUNABLES, AlgorithmConfig, LearnerConfig, LoraConfig
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
        # the workers started with learner.malloc_tunables in their environment (glibc reads it at exec)
        assert learner.setup()["malloc_tunables"].endswith(LEARNER_MALLOC_TUNABLES)
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


def test_no_kl_keeps_no_reference(local_ray, model_path, tmp_path):
    """A KL coefficient of 0: a full finetune keeps no frozen copy, and neither pass computes reference logprobs
    (None, never zeros standing in for them); the step still trains."""
    import ray

    from rayalign.learner.batch import minibatch_plan, pad_rollouts
    from rayalign.learner.group import Learner

    algo = AlgorithmConfig(name="grpo", kl_in="loss", kl_coef=0.0, minibatch_size=4)
    learner = Learner(model_path, learner=LearnerConfig(finetune="full", micro_batch_size=2, lr=1e-4),
                      lora=LoraConfig(), algorithm=algo, storage_path=str(tmp_path), run_name="no-kl", seed=0)
    try:
        info = learner.setup()
        assert info["reference_params_on_rank"] == 0 and info["trainable_params"] == info["params"]
        batch = pad_rollouts(_rollouts(model_path))
        batch["advantages"] = torch.tensor([[1.0], [-1.0], [0.5]]) * batch["response_mask"]
        before = learner.forward(ray.put(batch), 3, 1.0)
        assert before["ref_logprobs"] is None and before["logprobs"].shape == batch["response_mask"].shape
        stats, seen = learner.train(ray.put(batch), minibatch_plan(3, 4, 1, 2, 1, torch.Generator().manual_seed(0)),
                                    1.0, 0.0, single_pass=True)
        after = learner.forward(ray.put(batch), 3, 1.0)
    finally:
        learner.shutdown()
    mask = batch["response_mask"].bool()
    assert seen["ref_logprobs"] is None and "kl_loss" not in stats and stats["optimizer_steps"] == 1
    assert torch.allclose(seen["logprobs"][mask], before["logprobs"][mask], atol=1e-4)  # the pass before the step
    assert (after["logprobs"] - before["logprobs"])[mask].abs().max() > 1e-3  # and the step moved the policy


def _hf_logprobs(model, rollouts: list[Rollout]) -> list[torch.Tensor]:
    """Each rollout's response-token logprobs under ``model`` (plain HF, temperature 1), one sequence at a time."""
    out = []
    with torch.no_grad():
        for r in rollouts:
            ids = torch.tensor([r.prompt_token_ids + r.response_token_ids])
            logits = model(input_ids=ids).logits[0, len(r.prompt_token_ids) - 1:-1].float()
            out.append(logits.log_softmax(-1).gather(-1, torch.tensor(r.response_token_ids)[:, None])[:, 0])
    return out


def _two_rank_step(model_path: str):
    """The three rollouts with fixed advantages, their response mask, and one optimizer step's plan over 2 ranks
    (micro-batches of 1)."""
    from rayalign.learner.batch import minibatch_plan, pad_rollouts

    rollouts = _rollouts(model_path)
    batch = pad_rollouts(rollouts)
    batch["advantages"] = torch.tensor([[1.0], [-1.0], [0.5]]) * batch["response_mask"]
    plan = minibatch_plan(3, 4, 2, 1, 1, torch.Generator().manual_seed(0))
    return rollouts, batch, batch["response_mask"].bool(), plan


def test_zero3_learner_exports_and_resumes_whole_weights(local_ray, model_path, tmp_path):
    """ZeRO-3 on 2 ranks (every weight sharded): after a real update, the merged weights and the adapter it
    publishes, the final model it saves and the checkpoint it writes all give the policy's own logprobs."""
    import ray
    from peft import LoraConfig as PeftLoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import read_buckets
    from rayalign.learner.group import Learner
    from rayalign.weights.store import WeightStore, write_adapter_files

    lora = LoraConfig()
    config = LearnerConfig(num_workers=2, zero_stage=3, micro_batch_size=1, lr=1e-3)
    algo = AlgorithmConfig(name="grpo", kl_in="loss", minibatch_size=4)
    rollouts, batch, mask, plan = _two_rank_step(model_path)
    store = ray.remote(WeightStore).options(name="zero3-store").remote()

    def new_learner(run_name, **kwargs):
        return Learner(model_path, learner=config, lora=lora, algorithm=algo, storage_path=str(tmp_path),
                       run_name=run_name, seed=0, **kwargs)

    learner = new_learner("zero3")
    try:
        info = learner.setup()
        lora_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path),
                                    PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha,
                                                   target_modules=list(lora.target_modules)))
        assert info["trainable_params"] == sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
        assert info["params"] == sum(p.numel() for p in lora_model.parameters())
        assert info["params_on_rank"] <= info["params"] // 2 + 1000  # each rank holds its half of every weight
        first = learner.forward(ray.put(batch), 3, 1.0)
        assert torch.equal(first["logprobs"], first["ref_logprobs"])
        learner.train(ray.put({**batch, "logprobs": first["logprobs"], "ref_logprobs": first["ref_logprobs"]}),
                      plan, 1.0, 0.05)
        policy = learner.forward(ray.put(batch), 3, 1.0)["logprobs"]
        assert (policy - first["logprobs"])[mask].abs().max() > 1e-3  # the update moved the policy

        learner.publish("zero3-store", 1, "full", "float32")
        merged = AutoModelForCausalLM.from_pretrained(model_path)
        weights = read_buckets(ray.get(store.latest.remote()))
        assert set(weights) == set(dict(merged.named_parameters()))  # the tied lm_head once, as the embedding
        merged.load_state_dict(weights, strict=False)
        assert merged.lm_head.weight is merged.model.embed_tokens.weight
        learner.publish("zero3-store", 2, "adapter", "float32")
        adapter = write_adapter_files(ray.get(store.latest.remote()), tmp_path / "published")
        learner.checkpoint(1, {"step": 1})
        saved = learner.save(str(tmp_path / "final"), model_path)
    finally:
        learner.shutdown()
    ray.get(store.close.remote())

    models = {"published merged": merged,
              "published adapter": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), adapter),
              "saved merged": AutoModelForCausalLM.from_pretrained(saved["merged"]),
              "saved adapter": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path),
                                                         saved["adapter"])}
    for what, model in models.items():
        for row, logprobs in enumerate(_hf_logprobs(model.eval(), rollouts)):
            assert torch.allclose(logprobs, policy[row, :len(logprobs)], atol=1e-4), what

    resumed = new_learner("zero3-resumed", resume_from=str(tmp_path / "zero3" / "checkpoint_000001"))
    try:
        resumed.setup()
        again = resumed.forward(ray.put(batch), 3, 1.0)["logprobs"]
    finally:
        resumed.shutdown()
    assert torch.allclose(again[mask], policy[mask], atol=1e-5)


@pytest.mark.long  # two 2-rank learners
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_full_finetune_keeps_the_frozen_reference(local_ray, model_path, tmp_path, zero_stage):
    """Full finetune on 2 ranks: the frozen reference (sharded like the policy under ZeRO-3, whole otherwise) gives
    the base model's logprobs before and after an update, while the policy's move; the published weights give the
    policy's."""
    import ray
    from transformers import AutoModelForCausalLM

    from conftest import read_buckets
    from rayalign.learner.group import Learner
    from rayalign.weights.store import WeightStore

    config = LearnerConfig(num_workers=2, zero_stage=zero_stage, finetune="full", micro_batch_size=1, lr=1e-4)
    algo = AlgorithmConfig(name="grpo", kl_in="loss", minibatch_size=4)
    rollouts, batch, mask, plan = _two_rank_step(model_path)
    learner = Learner(model_path, learner=config, lora=LoraConfig(), algorithm=algo, storage_path=str(tmp_path),
                      run_name=f"full-zero{zero_stage}", seed=0)
    try:
        info = learner.setup()
        assert info["trainable_params"] == info["params"]
        if zero_stage == 3:
            assert 0 < info["reference_params_on_rank"] <= info["params"] // 2 + 1000  # half of every frozen weight
        else:
            assert info["reference_params_on_rank"] == info["params"]
        first = learner.forward(ray.put(batch), 3, 1.0)
        stats, _ = learner.train(ray.put(batch), plan, 1.0, 0.05, single_pass=True)
        after = learner.forward(ray.put(batch), 3, 1.0)
        store = ray.remote(WeightStore).options(name=f"full-zero{zero_stage}-store").remote()
        learner.publish(f"full-zero{zero_stage}-store", 1, "full", "float32")
        published = AutoModelForCausalLM.from_pretrained(model_path)
        published.load_state_dict(read_buckets(ray.get(store.latest.remote())), strict=False)
        ray.get(store.close.remote())
    finally:
        learner.shutdown()

    base = _hf_logprobs(AutoModelForCausalLM.from_pretrained(model_path).eval(), rollouts)
    for row, logprobs in enumerate(base):
        n = len(logprobs)
        for what in (first["logprobs"], first["ref_logprobs"], after["ref_logprobs"]):
            assert torch.allclose(what[row, :n], logprobs, atol=1e-4)
    assert stats["optimizer_steps"] == 1
    assert (after["logprobs"] - after["ref_logprobs"])[mask].abs().max() > 1e-3  # the policy moved, not the reference
    for row, logprobs in enumerate(_hf_logprobs(published.eval(), rollouts)):
        assert torch.allclose(logprobs, after["logprobs"][row, :len(logprobs)], atol=1e-4)
