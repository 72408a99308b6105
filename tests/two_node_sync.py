"""Full-weight sync to an engine on another Ray node, run by `tests/test_two_node.py` in a process of its own (it
starts its own two-node Ray cluster on this machine with `ray.cluster_utils.Cluster`, as Ray's own multi-node tests
do). The driver (head node, no CPUs) publishes; the engine (second node) must copy the buckets through the object
store before it loads them. Then the driver pushes other weights by broadcast (gloo), which needs no copy. Writes
what it saw as JSON to <result.json>; exits non-zero on any failed check.

    python tests/two_node_sync.py <model_dir> <result.json>
"""

from __future__ import annotations

import glob
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(model_path: str, result: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from rayalign.config import EngineConfig, ModelConfig, SamplingConfig
    from rayalign.weights.broadcast import ProcessSender
    from rayalign.rollout.group import RolloutGroup
    from rayalign.weights.shm import SHM_DIR
    from rayalign.weights import SyncPlan
    from rayalign.weights.store import full_payload
    from test_rollout import hf_greedy, perturbed_model

    # object stores large enough for two 113 MB buckets in flight: a test cluster's default is 150 MB, and past it
    # Ray falls back to disk, where a nearly full disk fails the read with OutOfDiskError (seen in CI)
    store = 1 << 30
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": store})
    cluster.add_node(num_cpus=1, object_store_memory=store)
    ray.init(address=cluster.address)
    group = None
    try:
        group = RolloutGroup(model_path, ModelConfig(dtype="float32"), EngineConfig(num_engines=1, max_model_len=512),
                             sync_plan=SyncPlan("full"), name="two-node")
        here = ray.get_runtime_context().get_node_id()
        engine_node = group.infos()[0]["node_id"]
        assert engine_node != here, "the engine should run on the second node"

        model = perturbed_model(model_path)
        published = full_payload(group.next_version(), model.named_parameters(), bucket_bytes=64 * 1024**2)
        assert {b.node_id for b in published.buckets} == {here}
        group.publish(published)
        report = group.sync()
        assert report.copied_bytes == (published.nbytes,), (report.copied_bytes, published.nbytes)
        copies = [str(SHM_DIR / f"rayalign-*-copy-*-{Path(b.path).name}") for b in published.buckets]
        left = [c for pattern in copies for c in glob.glob(pattern)]
        assert not left, f"the engine left its copies behind: {left}"

        greedy = SamplingConfig(temperature=0.0, max_new_tokens=16)
        prompts = ["What protein can I add to a salad?", "Suggest a healthy breakfast."]
        after = group.generate(prompts, greedy)
        assert all(r.policy_version == published.version for r in after)
        matches = [list(r.response_token_ids[:16]) == hf_greedy(model, r.prompt_token_ids) for r in after]
        assert all(matches), matches

        group.publish(full_payload(group.next_version(), model.named_parameters(), bucket_bytes=64 * 1024**2))
        deadline = time.monotonic() + 30  # the store may sit on the other node: it deletes through a task there
        while any(Path(b.path).exists() for b in published.buckets) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(Path(b.path).exists() for b in published.buckets), "a newer version removes the old files"
        again = group.sync()  # the read tasks' worker processes exist by now
        assert again.copied_bytes == report.copied_bytes

        # the same weights' other road: a gloo broadcast from this process (head node) to the engine's worker
        other = perturbed_model(model_path, seed=1)
        sender = ProcessSender(other.named_parameters, bucket_bytes=64 * 1024**2)
        pushes = [group.push(group.next_version(), sender) for _ in range(2)]  # the first one forms the group
        assert all(p.sent_bytes == published.nbytes and p.copied_bytes == (0,) for p in pushes)
        pushed = group.generate(prompts, greedy)
        assert all(r.policy_version == pushes[-1].version for r in pushed)
        matches = [list(r.response_token_ids[:16]) == hf_greedy(other, r.prompt_token_ids) for r in pushed]
        assert all(matches) and [r.response_token_ids for r in pushed] != [r.response_token_ids for r in after]
        seen = {"engine_node": engine_node, "driver_node": here, "copied_bytes": report.copied_bytes[0],
                "buckets": len(published.buckets), "sync_seconds": [round(r.seconds, 3) for r in (report, again)],
                "broadcast_seconds": [round(p.seconds, 3) for p in pushes]}
        Path(result).write_text(json.dumps(seen))
    finally:
        if group is not None:
            group.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
