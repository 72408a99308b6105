"""What a job's actors reserve, computed from its config in one place, and whether a cluster can ever hold them.

A job is a list of `Phase`s: the actors that run at the same time (PPO: engines, judge replicas, reward-model
actors and learner workers all at once; evaluate: generation, then judging). Each actor is a `Bundle` of Ray
resources that must fit on one node: a learner worker, an engine (``tensor_parallel_size`` GPUs on one node), a
judge replica (with its accelerator type). The same bundles are checked

  - before launch, against a KubeRay manifest: ``python jobs/ppo.py --config <profile> --check-cluster
    cluster/raycluster.yaml`` packs every phase onto the most nodes each worker group can scale to;
  - at start, against the live cluster (`check_live`): a cluster that cannot hold the job now and has no
    autoscaler is refused at once; one with an autoscaler is asked for the bundles and given ``ray.resource_wait_s``
    to grow before the job is refused. Either way the error is one line naming what is missing.

Light to import: Ray is imported inside the functions that talk to a live cluster.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from rayalign.config import ConfigError, EngineConfig, JudgeConfig, LearnerConfig, RewardConfig

ACCELERATOR_LABEL = "ray.io/accelerator-type"
"""Ray's node label for the GPU model; KubeRay worker groups set it in ``labels`` (Ray sets it itself on GPUs)."""
ACCELERATOR_RESOURCE = "accelerator_type:"
"""Prefix of the resource Ray gives a node with that GPU model (what ``accelerator_type=`` actor options ask for)."""
EPS = 1e-9


@dataclasses.dataclass(frozen=True)
class Bundle:
    """``count`` actors of one kind, each needing ``resources`` on a single node."""

    role: str
    """What runs in it, as the error names it: "rollout engine", "judge replica", "learner worker"..."""
    resources: Mapping[str, float]
    """Ray resources of one actor ({"CPU": 8, "GPU": 4, "rollout": 1}); zero entries are left out."""
    count: int = 1
    """How many such actors run at once."""
    accelerator_type: str = ""
    """GPU model the actor must run on ("H100"), or "" for any node."""

    def describe(self) -> str:
        parts = [f"{k} {v:g}" for k, v in sorted(self.resources.items())]
        if self.accelerator_type:
            parts.append(f"on {self.accelerator_type}")
        return f"{self.count} {self.role}{'s' if self.count != 1 else ''} of {{{', '.join(parts)}}}"


@dataclasses.dataclass(frozen=True)
class Phase:
    """Actors that run at the same time; a job's phases take turns, so each must fit on its own."""

    name: str
    bundles: tuple[Bundle, ...]

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for b in self.bundles:
            for k, v in b.resources.items():
                out[k] = out.get(k, 0.0) + v * b.count
        return out


def _bundle(role: str, count: int, cpus: float, gpus: float, extra: Mapping[str, float] | None = None,
            accelerator_type: str = "") -> Bundle | None:
    resources = {"CPU": float(cpus), "GPU": float(gpus), **{k: float(v) for k, v in (extra or {}).items()}}
    resources = {k: v for k, v in resources.items() if v > 0}
    return Bundle(role, resources, count, accelerator_type) if count > 0 else None


def engines(engine: EngineConfig, role: str = "rollout engine") -> list[Bundle]:
    """``engine.num_engines`` vLLM engines, each ``num_gpus`` (>= tensor_parallel_size) GPUs on one node."""
    b = _bundle(role, engine.num_engines, engine.num_cpus, engine.num_gpus, engine.resources,
                engine.accelerator_type)
    return [b] if b else []


def learner(config: LearnerConfig) -> list[Bundle]:
    """Ray Train's workers, one DeepSpeed rank each (Ray Train packs them onto as few nodes as fit)."""
    b = _bundle("learner worker", config.num_workers, config.num_cpus_per_worker, config.num_gpus_per_worker,
                config.resources_per_worker, config.accelerator_type)
    return [b] if b else []


def judge(config: JudgeConfig) -> list[Bundle]:
    """The judge's Serve replicas at their autoscaling maximum (vllm and ray_serve_llm backends); an endpoint
    reserves nothing."""
    from rayalign.judge.reward import HOSTED

    if config.backend not in HOSTED:
        return []
    return engines(dataclasses.replace(config.engine, num_engines=config.max_replicas), role="judge replica")


def reward(config: RewardConfig) -> list[Bundle]:
    """The reward's actors: the judge's replicas where a component uses the hosted judge, one actor per reward
    model. Rules run in the driver."""
    from rayalign.judge.reward import components, serves_judge

    out = judge(config.judge) if serves_judge(config) else []
    for c in components(config):
        if c.kind == "reward_model":
            b = _bundle(f"reward model '{c.name}'", 1, c.num_cpus, c.num_gpus)
            out += [b] if b else []
    return out


def cpu_tasks(role: str, count: int, cpus: float) -> list[Bundle]:
    """``count`` small CPU tasks (Ray Data's light stages)."""
    b = _bundle(role, count, cpus, 0)
    return [b] if b else []


# --- Nodes and fitting ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NodeGroup:
    """Nodes of one kind: a KubeRay worker group at its largest, the head, or one live Ray node."""

    name: str
    resources: Mapping[str, float]
    """Ray resources of one node."""
    max_count: int
    """Most nodes of this kind the cluster can have."""
    accelerator_type: str = ""


def fit(phase: Phase, groups: Sequence[NodeGroup]) -> list[str]:
    """Pack ``phase``'s bundles onto ``groups``' nodes (largest bundles first, each on the first node with room);
    returns what did not fit, one phrase per kind of bundle ([] when everything fits)."""
    nodes: list[tuple[NodeGroup, dict[str, float]]] = []
    demand = sum(b.count for b in phase.bundles)
    for g in groups:  # never more nodes of a group than there are bundles to place
        nodes += [(g, dict(g.resources)) for _ in range(min(g.max_count, demand))]

    def size(b: Bundle) -> tuple:
        return (b.resources.get("GPU", 0.0), b.resources.get("CPU", 0.0), sum(b.resources.values()))

    missing = []
    for b in sorted(phase.bundles, key=size, reverse=True):
        placed = 0
        for _ in range(b.count):
            for g, free in nodes:
                if _holds(g, free, b):
                    for k, v in b.resources.items():
                        free[k] = free.get(k, 0.0) - v
                    placed += 1
                    break
            else:
                break
        if placed < b.count:
            missing.append(_why(b, placed, groups))
    if missing:  # say which totals ran out, if any did
        offered = {k: sum(g.resources.get(k, 0.0) * g.max_count for g in groups) for k in phase.totals()}
        over = [f"{k} {v:g} of {offered[k]:g}" for k, v in sorted(phase.totals().items()) if v > offered[k] + EPS]
        if over:
            missing[-1] += f" (the phase needs more than the cluster has in all: {', '.join(over)})"
    return missing


def _holds(group: NodeGroup, free: Mapping[str, float], b: Bundle) -> bool:
    if b.accelerator_type and group.accelerator_type != b.accelerator_type:
        return False
    return all(free.get(k, 0.0) + EPS >= v for k, v in b.resources.items())


def _why(b: Bundle, placed: int, groups: Sequence[NodeGroup]) -> str:
    """Why ``b`` did not fit: no node type can hold even one of them (and what the closest one lacks), or the
    cluster runs out after ``placed``."""
    wanted = b.describe()
    candidates = [g for g in groups if not b.accelerator_type or g.accelerator_type == b.accelerator_type]
    if not candidates:
        have = sorted({g.accelerator_type for g in groups if g.accelerator_type})
        return (f"{wanted}: no node has accelerator type {b.accelerator_type} (the cluster's: "
                f"{', '.join(have) or 'none declared'})")
    if any(_holds(g, g.resources, b) for g in candidates):
        return f"{wanted}: only {placed} fit on the cluster at its largest"

    def lacks(g: NodeGroup) -> dict[str, float]:
        return {k: g.resources.get(k, 0.0) for k, v in b.resources.items() if g.resources.get(k, 0.0) + EPS < v}

    closest = min(candidates, key=lambda g: (len(lacks(g)), -sum(h / b.resources[k] for k, h in lacks(g).items())))
    detail = ", ".join(f"{k} {have:g} of {b.resources[k]:g}" for k, have in lacks(closest).items())
    return f"{wanted}: no node can hold one (the closest, group {closest.name}, has {detail})"


# --- KubeRay manifests ----------------------------------------------------------------------------------------


def _quantity(text: Any) -> float:
    """A Kubernetes CPU/GPU quantity ("8", "500m", 2) as a number."""
    s = str(text).strip()
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def _group(name: str, spec: Mapping[str, Any], count: int) -> NodeGroup:
    """A KubeRay head or worker group as Ray will see its nodes: the group's ``resources`` override
    ``rayStartParams`` (num-cpus, num-gpus, resources), which override the first container's limits."""
    params = spec.get("rayStartParams") or {}
    containers = (((spec.get("template") or {}).get("spec") or {}).get("containers") or [{}])
    limits = ((containers[0].get("resources") or {}).get("limits")) or {}
    res: dict[str, float] = {}
    if "cpu" in limits:
        res["CPU"] = math.floor(_quantity(limits["cpu"]))  # Ray rounds a pod's fractional CPU limit down
    if "nvidia.com/gpu" in limits:
        res["GPU"] = _quantity(limits["nvidia.com/gpu"])
    if "num-cpus" in params:
        res["CPU"] = _quantity(params["num-cpus"])
    if "num-gpus" in params:
        res["GPU"] = _quantity(params["num-gpus"])
    if "resources" in params:
        custom = params["resources"].strip().strip("'\"").replace('\\"', '"')
        try:
            res.update({k: float(v) for k, v in json.loads(custom).items()})
        except (ValueError, AttributeError) as e:
            raise ConfigError(f"group {name}: rayStartParams.resources is not a JSON object ({e})") from None
    for k, v in (spec.get("resources") or {}).items():
        res[k] = _quantity(v)
    accelerator = (spec.get("labels") or {}).get(ACCELERATOR_LABEL, "")
    accelerator = accelerator or next((k[len(ACCELERATOR_RESOURCE):] for k in res if k.startswith(ACCELERATOR_RESOURCE)), "")
    return NodeGroup(name, res, count, accelerator)


def manifest_groups(path: str | Path) -> list[NodeGroup]:
    """The node kinds of a RayCluster, RayJob or RayService manifest, each at the most nodes it may scale to
    (``maxReplicas x numOfHosts`` with autoscaling on, else ``replicas x numOfHosts``). Raises ConfigError."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--check-cluster {path}: cannot read the manifest ({type(e).__name__})") from None
    spec = (doc or {}).get("spec") or {}
    kind = (doc or {}).get("kind", "")
    cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
               "RayService": spec.get("rayClusterConfig")}.get(kind)
    if not cluster:
        raise ConfigError(f"--check-cluster {path}: expected a KubeRay RayCluster, RayJob or RayService, got "
                          f"{kind or 'no kind'}")
    autoscale = bool(cluster.get("enableInTreeAutoscaling"))
    groups = [_group("head", cluster.get("headGroupSpec") or {}, 1)]
    for g in cluster.get("workerGroupSpecs") or []:
        count = int(g.get("maxReplicas", 2**31 - 1) if autoscale else g.get("replicas", 0))
        if g.get("suspend"):
            count = 0
        groups.append(_group(g.get("groupName", "?"), g, count * int(g.get("numOfHosts", 1))))
    return groups


def check_phases(phases: Iterable[Phase], groups: Sequence[NodeGroup], where: str) -> list[str]:
    """Every phase fitted onto ``groups``: the lines of a report, the first one saying whether it fits.
    Raises ConfigError with one line when a phase cannot fit."""
    lines = []
    for phase in phases:
        missing = fit(phase, groups)
        if missing:
            raise ConfigError(f"{where} can never hold this job's {phase.name} phase: {'; '.join(missing)}")
        totals = ", ".join(f"{k} {v:g}" for k, v in sorted(phase.totals().items()))
        lines.append(f"  {phase.name}: {'; '.join(b.describe() for b in phase.bundles) or 'nothing'} "
                     f"(in all: {totals or 'nothing'})")
    nodes = ", ".join(f"{g.name}: up to {g.max_count} x {{{', '.join(f'{k} {v:g}' for k, v in sorted(g.resources.items()))}}}"
                      + (f" {g.accelerator_type}" if g.accelerator_type else "") for g in groups)
    return [f"{where} can hold this job", *lines, f"  nodes: {nodes}"]


# --- The live cluster -----------------------------------------------------------------------------------------


def live_groups() -> list[NodeGroup]:
    """The joined cluster's alive nodes as they are now, one group each."""
    import ray

    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = {k: float(v) for k, v in n.get("Resources", {}).items() if not k.startswith("node:")
               and k not in ("memory", "object_store_memory")}
        accelerator = next((k[len(ACCELERATOR_RESOURCE):] for k in res if k.startswith(ACCELERATOR_RESOURCE)), "")
        out.append(NodeGroup(f"node {n.get('NodeManagerAddress', '?')}", res, 1, accelerator))
    return out


def autoscaler_running() -> bool:
    """Whether the joined cluster has an autoscaler that may add nodes. Ray's monitor runs on every head: with an
    autoscaling config (KubeRay's in-tree autoscaler) it reports nodes under their configured node types; without
    one (``ray start --head``) it runs read-only and names each node's type after the node itself ("node_<id>").
    Autoscaler v2 reports its own iterations to the GCS instead."""
    import ray
    from ray._private import ray_constants
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    if is_autoscaler_v2(fetch_from_server=True):
        from ray.autoscaler.v2.sdk import get_cluster_status

        stats = get_cluster_status(ray.get_runtime_context().gcs_address).stats
        return stats.autoscaler_iteration_time_s is not None or stats.autoscaler_version not in ("", "0", None)
    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = (json.loads(raw) if raw else {}).get("autoscaler_report") or {}
    types = (report.get("node_type_mapping") or {}).items()
    return any(kind != format_readonly_node_type(node) for node, kind in types) or bool(report.get("pending_launches"))


def check_live(phases: Sequence[Phase], *, wait_s: float, local: bool = False, autoscaling: bool | None = None,
               poll_s: float = 5.0) -> None:
    """Raise ConfigError unless the joined Ray can hold every phase. One that cannot hold one now is refused at
    once unless it autoscales (``autoscaling``; None: ask `autoscaler_running`; a ``local`` Ray never does); then
    the autoscaler is asked for the largest phase's bundles and the cluster given ``wait_s`` seconds to grow."""
    def missing() -> list[str]:
        groups = live_groups()
        return [m for p in phases for m in fit(p, groups)]

    short = missing()
    if not short:
        return
    if local:
        raise ConfigError(f"the local Ray is too small for this job: {'; '.join(short)}; raise ray.num_cpus "
                          "(logical CPUs may exceed the cores: the job's phases mostly take turns) or lower the "
                          "per-actor num_cpus")
    if autoscaling is None:
        autoscaling = autoscaler_running()
    if not autoscaling:
        raise ConfigError(f"the Ray cluster cannot hold this job and has no autoscaler to grow it: {'; '.join(short)}"
                          "; add nodes, give them more logical CPUs (ray start --num-cpus N) or lower the per-actor "
                          "num_cpus")
    from ray.autoscaler.sdk import request_resources

    largest = max(phases, key=lambda p: sum(b.count for b in p.bundles))
    request_resources(bundles=[dict(b.resources) for b in largest.bundles for _ in range(b.count)])
    deadline = time.monotonic() + wait_s
    try:
        while (short := missing()) and time.monotonic() < deadline:
            time.sleep(poll_s)
    finally:
        request_resources(bundles=[])  # from here the job's own actors keep the nodes up
    if short:
        raise ConfigError(f"the Ray cluster did not grow to hold this job within {wait_s:g} s "
                          f"(ray.resource_wait_s): {'; '.join(short)}")


def offline_phases(learner_config: LearnerConfig, heldout_engine: EngineConfig | None) -> list[Phase]:
    """An offline trainer's phases (DPO, SFT, reward model): the learner, then (``heldout_engine``) the held-out
    answers on engines started beside it."""
    phases = [Phase("training", tuple(learner(learner_config)))]
    if heldout_engine is not None:
        held_out = engines(heldout_engine, role="held-out engine")
        phases.append(Phase("held-out", (*learner(learner_config), *held_out)))
    return phases
