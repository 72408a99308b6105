"""Placement (rayalign.placement): what each job's actors reserve, packed onto a KubeRay manifest's nodes and
checked against a live Ray; every job's GPU profile fits the shipped cluster; the RayService's Serve config loads
with Serve's and ray.serve.llm's own schemas."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT, load_job, ray_head
from rayalign import config as C
from rayalign import placement as P

GPU_PROFILES = {  # job -> (its config class, its GPU profile)
    "ppo": ("PPOJobConfig", "ppo_gpu"),
    "dpo": ("DPOJobConfig", "dpo_gpu"),
    "sft": ("SFTJobConfig", "sft_gpu"),
    "train_reward_model": ("RewardModelJobConfig", "reward_model_gpu"),
    "generate_prompts": ("GeneratePromptsConfig", "generate_prompts_gpu"),
    "generate_preferences": ("GeneratePreferencesConfig", "generate_preferences_gpu"),
    "evaluate": ("EvalConfig", "evaluate_gpu"),
    "serve": ("ServeJobConfig", "serve_gpu"),
    "sample": ("SampleConfig", "sample_gpu"),
}


def _job_config(job: str):
    return getattr(load_job(f"{job}.py"), GPU_PROFILES[job][0])


def _node(name: str, cpus: float, gpus: float = 0, count: int = 1, accelerator: str = "", **extra) -> P.NodeGroup:
    return P.NodeGroup(name, {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **extra}, count, accelerator)


def _ppo_like() -> P.Phase:
    """ppo_gpu.yaml's shape: 4 one-GPU engines, 2 judge replicas of 4 GPUs on H100, 4 one-GPU learner workers."""
    engine = C.EngineConfig(num_engines=4, num_gpus=1, num_cpus=4)
    judge = C.JudgeConfig(num_replicas=2, max_replicas=2, engine=C.EngineConfig(
        tensor_parallel_size=4, num_gpus=4, num_cpus=8, accelerator_type="H100"))
    learner = C.LearnerConfig(num_workers=4, num_gpus_per_worker=1, num_cpus_per_worker=8, dtype="bfloat16")
    return P.Phase("training", (*P.engines(engine), *P.judge(judge), *P.learner(learner)))


def test_a_job_that_fits_packs_and_one_gpu_short_names_what_is_missing():
    phase = _ppo_like()
    assert phase.totals() == {"CPU": 64.0, "GPU": 16.0}
    assert P.fit(phase, [_node("head", 0), _node("gpu", 64, 8, count=2, accelerator="H100")]) == []
    # one GPU short: the cluster at its largest has 15 GPUs, so the last one-GPU bundle placed is left over
    short = P.fit(phase, [_node("gpu", 64, 8, accelerator="H100"), _node("small", 64, 7, accelerator="H100")])
    assert short == ["4 rollout engines of {CPU 4, GPU 1}: only 3 fit on the cluster at its largest (the phase "
                     "needs more than the cluster has in all: GPU 16 of 15)"]
    # a tensor-parallel replica's 4 GPUs must share a node: 16 one-GPU nodes hold the GPUs but not the replicas
    short = P.fit(phase, [_node("gpu", 16, 1, count=16, accelerator="H100")])
    assert short == ["2 judge replicas of {CPU 8, GPU 4, on H100}: no node can hold one (the closest, group gpu, "
                     "has GPU 1 of 4)"]


def test_an_accelerator_type_no_node_declares_is_refused():
    phase = _ppo_like()
    short = P.fit(phase, [_node("gpu", 64, 8, count=4)])  # GPUs enough, but no group says they are H100s
    assert short == ["2 judge replicas of {CPU 8, GPU 4, on H100}: no node has accelerator type H100 "
                     "(the cluster's: none declared)"]
    assert "(the cluster's: A10G)" in P.fit(phase, [_node("gpu", 64, 8, count=4, accelerator="A10G")])[0]


def test_custom_resources_pin_bundles_to_the_nodes_that_offer_them():
    engine = C.EngineConfig(num_engines=2, resources={"rollout": 1})
    learner = C.LearnerConfig(num_workers=1, resources_per_worker={"learner": 1})
    phase = P.Phase("training", (*P.engines(engine), *P.learner(learner)))
    nodes = [_node("head", 4, learner=1), _node("workers", 2, rollout=1, count=2)]
    assert P.fit(phase, nodes) == []
    assert "only 1 fit" in P.fit(phase, [_node("head", 4, learner=1), _node("workers", 2, rollout=1)])[0]
    with pytest.raises(C.ConfigError, match="engine.resources.GPU: set GPU with its own key"):
        C.load_config(C.EngineConfig, None, ["resources.GPU=1"])
    assert C.load_config(C.EngineConfig, None, ["resources.rollout=1"]).resources == {"rollout": 1.0}


def test_manifest_groups_read_what_ray_will_see():
    groups = {g.name: g for g in P.manifest_groups(ROOT / "cluster" / "raycluster.yaml")}
    assert groups["head"].resources == {"CPU": 0.0} and groups["head"].max_count == 1
    assert groups["gpu"].resources == {"CPU": 64.0, "GPU": 8.0} and groups["gpu"].max_count == 4
    assert groups["gpu"].accelerator_type == "H100"
    assert groups["cpu"].resources == {"CPU": 16.0} and not groups["cpu"].accelerator_type


def test_manifest_fields_override_as_in_kuberay(tmp_path):
    doc = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "spec": {
        "headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [
            {"name": "h", "resources": {"limits": {"cpu": "3500m"}}}]}}},
        "workerGroupSpecs": [{"groupName": "w", "replicas": 2, "maxReplicas": 9, "numOfHosts": 2,
                              "rayStartParams": {"num-cpus": "6", "resources": '"{\\"rollout\\": 2}"'},
                              "resources": {"GPU": "2"},
                              "template": {"spec": {"containers": [
                                  {"name": "w", "resources": {"limits": {"cpu": "8", "nvidia.com/gpu": "1"}}}]}}}]}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    head, workers = P.manifest_groups(path)
    assert head.resources == {"CPU": 3.0}  # a fractional pod CPU limit rounds down
    assert workers.resources == {"CPU": 6.0, "GPU": 2.0, "rollout": 2.0} and workers.max_count == 4  # no autoscaler
    doc["spec"]["enableInTreeAutoscaling"] = True
    path.write_text(yaml.safe_dump(doc))
    assert P.manifest_groups(path)[1].max_count == 18
    path.write_text("kind: Deployment\n")
    with pytest.raises(C.ConfigError, match="expected a KubeRay RayCluster, RayJob or RayService, got Deployment"):
        P.manifest_groups(path)


@pytest.mark.parametrize("job", sorted(GPU_PROFILES))
def test_every_job_has_a_gpu_profile_that_fits_the_shipped_cluster(job):
    cls = _job_config(job)
    cfg = C.load_config(cls, ROOT / "jobs" / "configs" / f"{GPU_PROFILES[job][1]}.yaml")
    phases = cfg.phases()
    gpus = max(p.totals().get("GPU", 0) for p in phases)
    assert gpus >= 1, f"{job}'s GPU profile reserves no GPU"
    for manifest in ("raycluster.yaml", "rayjob.yaml"):
        report = P.check_phases(phases, P.manifest_groups(ROOT / "cluster" / manifest), manifest)
        assert report[0] == f"{manifest} can hold this job"


def test_check_cluster_command_line():
    """The same check from the command line, as a user runs it before paying for a cluster: exit 0 with the plan,
    2 with one line naming what is missing (a 4-GPU judge replica on the 1-GPU nodes of an edited manifest)."""
    ok = subprocess.run([sys.executable, "jobs/ppo.py", "--config", "jobs/configs/ppo_gpu.yaml",
                         "--check-cluster", "cluster/raycluster.yaml"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "cluster/raycluster.yaml can hold this job" in ok.stdout and "2 judge replicas" in ok.stdout
    bad = subprocess.run([sys.executable, "jobs/ppo.py", "--config", "jobs/configs/ppo_gpu.yaml",
                          "reward.judge.engine.tensor_parallel_size=8", "reward.judge.engine.num_gpus=9",
                          "--check-cluster", "cluster/raycluster.yaml"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2
    last = bad.stderr.strip().splitlines()[-1]
    assert last == ("cluster check: cluster/raycluster.yaml can never hold this job's training phase: 2 judge "
                    "replicas of {CPU 8, GPU 9, on H100}: no node can hold one (the closest, group gpu, has GPU 8 of 9)")


def test_hosted_judge_by_url_reserves_no_judge_gpus():
    cfg = C.load_config(load_job("ppo.py").PPOJobConfig, ROOT / "jobs" / "configs" / "ppo_gpu.yaml", [
        "reward.judge.backend=openai", "reward.judge.url=http://rayalign-serve-svc:8000/judge/v1",
        "reward.judge.endpoint_model=judge"])
    assert cfg.phases()[0].totals()["GPU"] == 8  # engines and learner only: the RayService hosts the judge


def test_rayjob_runs_ppo_with_its_gpu_profile():
    doc = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    assert doc["spec"]["entrypoint"] == "python jobs/ppo.py --config jobs/configs/ppo_gpu.yaml"


def test_rayservice_serve_config_loads_with_serve_and_ray_serve_llm_schemas():
    from ray.serve.llm import LLMServingArgs
    from ray.serve.schema import ServeDeploySchema

    from rayalign.rollout.serve_llm import StrictIngress

    doc = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    apps = {a.name: a for a in serve_config.applications}
    assert set(apps) == {"judge", "chat"}
    for app in apps.values():
        assert app.import_path == "ray.serve.llm:build_openai_app"
        args = LLMServingArgs.model_validate(app.args)  # what build_openai_app does with its args
        assert args.ingress_cls_config.ingress_cls.__name__ == StrictIngress.__name__  # the string resolved
    judge = apps["judge"].args["llm_configs"][0]
    assert judge["engine_kwargs"]["tensor_parallel_size"] == 4
    assert judge["deployment_config"]["autoscaling_config"]["max_replicas"] > 1
    assert apps["chat"].args["llm_configs"][0]["lora_config"]["dynamic_lora_loading_path"].startswith("s3://")
    # the cluster it brings holds the judge at its largest: 4 replicas of 4 H100s
    judge_cfg = C.JudgeConfig(num_replicas=2, max_replicas=4, engine=C.EngineConfig(
        tensor_parallel_size=4, num_gpus=4, num_cpus=8, accelerator_type="H100"))
    P.check_phases([P.Phase("serving", tuple(P.judge(judge_cfg)))],
                   P.manifest_groups(ROOT / "cluster" / "rayservice.yaml"), "rayservice.yaml")


@pytest.mark.slow
def test_a_fixed_size_cluster_refuses_a_job_it_cannot_hold_at_once(tmp_path):
    """The issue's report: `ray start --head` on a 2-CPU machine, then a PPO job that needs more. It used to wait
    forever for its judge replica; now it stops within seconds with one line, as on a local Ray."""
    with ray_head(2) as (port, _, env):
        t0 = time.monotonic()
        run = subprocess.run([sys.executable, "jobs/ppo.py", f"ray.address=127.0.0.1:{port}", "trainer.total_steps=1",
                              "learner.num_cpus_per_worker=2"],
                             cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
        took = time.monotonic() - t0
    assert run.returncode == 2, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("config error: the Ray cluster cannot hold this job and has no autoscaler to grow it: ")
    assert "judge replica of {CPU 1}: only 0 fit" in last and "CPU 4 of 2" in last and took < 120


@pytest.mark.slow
def test_live_check_on_a_local_ray(local_ray):
    """The live side on the session's local Ray: what fits passes; what does not is refused at once on a Ray
    without an autoscaler (the local one runs Ray's monitor read-only), and after the bounded wait on one that
    autoscales but does not grow."""
    assert P.autoscaler_running() is False
    cpus = max(g.resources.get("CPU", 0) for g in P.live_groups())
    fits = P.Phase("x", (P.Bundle("worker", {"CPU": 1.0}),))
    too_big = P.Phase("x", (P.Bundle("worker", {"CPU": cpus + 1}),))
    P.check_live([fits], wait_s=0)
    with pytest.raises(C.ConfigError, match=r"has no autoscaler to grow it: 1 worker of \{CPU"):
        P.check_live([too_big], wait_s=0)
    with pytest.raises(C.ConfigError, match="the local Ray is too small for this job: 1 worker"):
        P.check_live([too_big], wait_s=0, local=True)
    t0 = time.monotonic()
    with pytest.raises(C.ConfigError, match=r"did not grow to hold this job within 1 s \(ray.resource_wait_s\)"):
        P.check_live([too_big], wait_s=1, autoscaling=True, poll_s=0.2)
    assert time.monotonic() - t0 < 30
