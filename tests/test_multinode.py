"""jobs/ppo.py across Ray nodes: a local multi-node cluster (`ray.cluster_utils.Cluster`: one raylet per node, each
with its own CPUs and a custom resource naming its role), the learner on one node, the rollout engine on another,
the judge on a third, put there by config (``learner.resources_per_worker``, ``engine.resources``,
``reward.judge.engine.resources``), not by luck. Two steps with LoRA adapter sync (through the object store) and two
with whole merged weights by a gloo broadcast (``learner.full_sync=broadcast``), each checked node by node."""

from __future__ import annotations

import pytest

from conftest import run_job

pytestmark = pytest.mark.slow

ROLES = ("learner", "rollout", "judge")  # each node's custom resource is named after its role
PLACED = ["learner.resources_per_worker.learner=1", "engine.resources.rollout=1",
          "reward.judge.engine.resources.judge=1"]
SMALL = ["trainer.total_steps=2", "trainer.prompts_per_step=4", "sampling.max_new_tokens=24", "heldout.enabled=false",
         "algorithm.name=dr_grpo", "sampling.n=2", "algorithm.dynamic_sampling=false", "algorithm.minibatch_size=8",
         "trainer.checkpoint_every=2"]


CLUSTER = """
import json, sys
from ray.cluster_utils import Cluster

c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True,
                                                  "dashboard_host": "127.0.0.1", "dashboard_port": None})
nodes = {role: c.add_node(num_cpus=2, resources={role: 1}).node_id for role in sys.argv[2:]}
c.wait_for_nodes()
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump({"address": c.address, "nodes": nodes}, f)
__import__("os").rename(sys.argv[1] + ".tmp", sys.argv[1])
sys.stdin.read()  # until the test closes it
c.shutdown()
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head with the driver's share (no role) and one 2-CPU node per role; the dashboard is on (Ray Train's
    controller reads the state API). It lives in a process of its own: `Cluster` resets the calling process's Ray
    state (internal KV, address) when it shuts down, which would break the test session's own Ray."""
    import json
    import subprocess
    import sys
    import time

    info = tmp_path_factory.mktemp("cluster") / "cluster.json"
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER, str(info), *ROLES], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 300
        while not info.exists():
            assert proc.poll() is None, "the multi-node cluster's process exited before the cluster was up"
            assert time.monotonic() < deadline, "the multi-node cluster did not start within 300 s"
            time.sleep(1)
        up = json.loads(info.read_text())
        yield up["address"], up["nodes"]
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()


WHERE = """
import json, sys
import ray
from ray.util.state import list_actors

ray.init(address=sys.argv[1], namespace="multinode-check", log_to_driver=False)
print(json.dumps([[a.class_name or "", a.node_id] for a in list_actors(detail=True, limit=10_000,
                                                                       raise_on_missing_output=False)]))
"""


def _where(address: str) -> dict[str, set[str]]:
    """Node ids of the actors jobs started on the cluster, by kind, read from its state API by a driver of its own
    (this test process may hold the session's Ray)."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", WHERE, address], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    kinds = {"VLLMEngine": "rollout", "rayalign-judge": "judge", "RayTrainWorker": "learner"}
    out: dict[str, set[str]] = {k: set() for k in kinds.values()}
    for name, node in json.loads(done.stdout.strip().splitlines()[-1]):
        for key, kind in kinds.items():
            if key in name:
                out[kind].add(node)
    return out


@pytest.mark.parametrize("sync", [
    pytest.param(["learner.lora_sync=adapter"], id="lora-adapter"),
    pytest.param(["learner.lora_sync=merged", "learner.full_sync=broadcast"], id="broadcast"),
])
def test_two_ppo_steps_spread_over_nodes(cluster, sync, tmp_path, model_path):
    address, node_of = cluster
    result = run_job("ppo.py", f"ray.address={address}", *PLACED, *SMALL, *sync, cwd=tmp_path, timeout=1200,
                     env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert result.returncode == 0, result.stderr[-5000:]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("rayalign-ppo").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "reward/mean")] == [1, 2]
    m = run.data.metrics
    assert m["sync/bytes"] > 0
    if "learner.full_sync=broadcast" in sync:
        assert m["sync/copied_bytes"] == 0  # the merged weights went by collective, nothing through files
    where = _where(address)  # every actor of each kind so far, this job's and the earlier one's
    for kind in ("learner", "rollout", "judge"):
        assert where[kind] == {node_of[kind]}, (kind, where[kind], node_of)
