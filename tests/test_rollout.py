"""Rollout engines with the real SmolLM2 on the CPU vLLM build: versions, both weight-sync transports, restarts.

Engines run in float32 so that their greedy tokens can be compared with HF `generate` token for token; with
bfloat16 engines the two may part ways after a few tokens where two logits are nearly tied.
"""

from __future__ import annotations

import pytest

from rayalign.config import EngineConfig, ModelConfig, SamplingConfig
from rayalign.weights import SyncPlan

pytestmark = pytest.mark.slow

PROMPTS = ["What protein can I add to a salad?", "How do I make a quick soup?",
           "What should I cook for a dinner party?", "Suggest a healthy breakfast."]
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=16)
FP32 = ModelConfig(dtype="float32")


@pytest.fixture(scope="module")
def full_group(local_ray, model_path):
    from rayalign.rollout.group import RolloutGroup

    group = RolloutGroup(model_path, FP32, EngineConfig(num_engines=2, max_model_len=512),
                         sync_plan=SyncPlan("full"), name="full")
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def lora_group(local_ray, model_path):
    from rayalign.rollout.group import RolloutGroup

    group = RolloutGroup(model_path, FP32, EngineConfig(num_engines=1, max_model_len=512),
                         sync_plan=SyncPlan("adapter"), max_lora_rank=8, name="lora")
    yield group
    group.shutdown()


def hf_greedy(model, prompt_token_ids, n_tokens=16):
    import torch

    ids = torch.tensor([list(prompt_token_ids)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def perturbed_model(model_path, seed=0):
    """The embedded model in float32 with seeded noise (0.3 of each tensor's std) on its MLP weights: different
    enough that greedy outputs change."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mlp" in name:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * 0.3)
    return model


def test_generate_spreads_over_engines_and_tags_versions(full_group):
    rollouts = full_group.generate(PROMPTS, GREEDY)
    assert [r.prompt for r in rollouts] == PROMPTS
    assert {r.engine_id for r in rollouts} == {0, 1}
    for r in rollouts:
        assert r.policy_version == full_group.version
        assert len(r.logprobs) == len(r.response_token_ids) > 0
        assert all(lp <= 0 for lp in r.logprobs)
        assert r.prompt_token_ids and r.response.strip()
    sampled = full_group.generate(PROMPTS[:1], SamplingConfig(temperature=1.0, n=3, max_new_tokens=8))
    assert len(sampled) == 3 and all(r.prompt == PROMPTS[0] for r in sampled)


def test_full_weight_sync_changes_outputs_and_matches_hf(full_group, model_path):
    from rayalign.weights.store import full_payload

    before = full_group.generate(PROMPTS, GREEDY)
    model = perturbed_model(model_path)
    version = full_group.next_version()
    full_group.publish(full_payload(version, model.named_parameters(), bucket_bytes=64 * 1024**2))
    report = full_group.sync()
    assert report.version == version and len(report.engine_seconds) == 2

    after = full_group.generate(PROMPTS, GREEDY)
    assert all(r.policy_version == version for r in after)
    assert [r.response_token_ids for r in after] != [r.response_token_ids for r in before]
    for r in after:
        assert list(r.response_token_ids[:16]) == hf_greedy(model, r.prompt_token_ids), r.prompt


def test_lora_sync_changes_outputs_and_matches_hf(lora_group, model_path, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rayalign.weights.store import adapter_payload

    before = lora_group.generate(PROMPTS, GREEDY)
    assert all(r.policy_version == 0 for r in before)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                                                 init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(0.5)
    for step in (1, 2):  # two versions: the second replaces the first adapter
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(1.5)
        peft_model.save_pretrained(tmp_path / f"v{step}")
        version = lora_group.next_version()
        lora_group.publish(adapter_payload(version, tmp_path / f"v{step}"))
        assert lora_group.sync().version == version
        after = lora_group.generate(PROMPTS, GREEDY)
        assert all(r.policy_version == version for r in after)
        assert [r.response_token_ids for r in after] != [r.response_token_ids for r in before]
        for r in after:
            assert list(r.response_token_ids[:16]) == hf_greedy(peft_model, r.prompt_token_ids), r.prompt


def test_added_engine_starts_on_the_latest_version(lora_group):
    assert lora_group.version > 0, "run after a LoRA sync"
    before = lora_group.generate(PROMPTS, GREEDY)
    lora_group.add_engines(1)  # what autoscaling does
    infos = lora_group.infos()
    assert [i["policy_version"] for i in infos] == [lora_group.version] * 2
    after = lora_group.generate(PROMPTS, GREEDY)
    assert {r.engine_id for r in after} == {0, 1}
    assert [r.response_token_ids for r in after] == [r.response_token_ids for r in before]


def test_killed_engine_restarts_on_the_latest_version(full_group, local_ray):
    ray = local_ray
    before = full_group.generate(PROMPTS, GREEDY)
    old = full_group.infos()
    assert full_group.version > 0, "run after a sync so that the restarted engine has weights to re-apply"
    ray.kill(full_group.engines[1], no_restart=False)
    after = full_group.generate(PROMPTS, GREEDY)  # the call waits for the restart and is retried by Ray
    infos = full_group.infos()
    assert infos[1]["pid"] != old[1]["pid"]
    assert [i["policy_version"] for i in infos] == [full_group.version] * 2
    assert all(r.policy_version == full_group.version for r in after)
    # The restarted engine re-applied the published full weights: same greedy tokens as before the kill.
    assert [r.response_token_ids for r in after] == [r.response_token_ids for r in before]


def test_broadcast_push_matches_hf_and_reaches_a_restarted_engine(full_group, model_path, local_ray):
    ray = local_ray
    before = full_group.generate(PROMPTS, GREEDY)
    from rayalign.weights.broadcast import ProcessSender

    model = perturbed_model(model_path, seed=1)
    sender = ProcessSender(model.named_parameters, bucket_bytes=64 * 1024**2)  # this process sends, over gloo
    version = full_group.next_version()
    report = full_group.push(version, sender)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert report.version == version and report.sent_bytes == nbytes and len(report.engine_seconds) == 2
    assert [i["policy_version"] for i in full_group.infos()] == [version] * 2

    after = full_group.generate(PROMPTS, GREEDY)
    assert {r.engine_id for r in after} == {0, 1} and all(r.policy_version == version for r in after)
    assert [r.response_token_ids for r in after] != [r.response_token_ids for r in before]
    for r in after:
        assert list(r.response_token_ids[:16]) == hf_greedy(model, r.prompt_token_ids), r.prompt

    # a restarted engine has nothing to pull (the store holds only a marker): the group re-forms around it and
    # the sender pushes the same version again before the engine generates
    from rayalign.rollout.engine import EngineBehindError

    old = full_group.infos()
    ray.kill(full_group.engines[1], no_restart=False)
    with pytest.raises(EngineBehindError, match="holds no policy version"):  # e.g. the chat route, meanwhile
        ray.get(full_group.engines[1].chat.remote([{"role": "user", "content": "Hi"}], GREEDY))
    again = full_group.generate(PROMPTS, GREEDY)
    infos = full_group.infos()
    assert infos[1]["pid"] != old[1]["pid"] and sender.sends == 2
    assert [i["policy_version"] for i in infos] == [version] * 2
    assert [r.response_token_ids for r in again] == [r.response_token_ids for r in after]


def test_chat_route_serves_the_current_policy(full_group, local_ray):
    import json
    import socket
    import urllib.error
    import urllib.request

    from rayalign.rollout.serve import start_chat_server, stop_chat_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = start_chat_server(full_group.engine_names, model_name="policy", port=port)
    assert url.startswith("http://127.0.0.1:")  # bound to localhost
    try:
        body = {"messages": [{"role": "user", "content": "Name a vegetable."}], "max_tokens": 8, "temperature": 0}
        req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=120).read())
        assert reply["choices"][0]["message"]["content"].strip()
        assert reply["policy_version"] == full_group.version
        assert 0 < reply["usage"]["completion_tokens"] <= 8
        bad = urllib.request.Request(f"{url}/v1/chat/completions", data=b'{"messages": []}',
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(bad, timeout=60)
        assert info.value.code == 400

        # The OpenAI-compatible judge backend, for real over HTTP against this route: every pair comes back
        # either scored or as an unparsable answer (a 135M policy is no judge), never as a transport error.
        from rayalign.config import JudgeConfig
        from rayalign.judge.openai_judge import OpenAIJudge

        judge = OpenAIJudge(JudgeConfig(backend="openai", url=f"{url}/v1", endpoint_model="policy", mode="score"))
        judgements = judge.judge(["What can I grill?"] * 2, ["Halloumi and vegetables.", "Sausages."])
        assert len(judgements) == 2
        for j in judgements:
            assert (j.score is not None and 0 <= j.score <= 1) or j.error == "unparsable judge answer", j
    finally:
        stop_chat_server()
