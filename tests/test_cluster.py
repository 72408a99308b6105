"""cluster/ manifests validate against the KubeRay CRDs' openAPIV3Schema (from ../shared/kuberay-crds)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

CRDS = ROOT.parent / "shared" / "kuberay-crds"
MANIFESTS = sorted((ROOT / "cluster").glob("*.yaml"))


@functools.lru_cache(maxsize=None)
def _schema(kind: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for path in CRDS.glob("ray.io_*.yaml"):
        crd = yaml.load(path.read_text(), Loader=loader)
        if crd["spec"]["names"]["kind"] == kind:
            version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
            return version["schema"]["openAPIV3Schema"]
    raise AssertionError(f"no CRD for {kind}")


@pytest.mark.skipif(not CRDS.is_dir(), reason="../shared/kuberay-crds is absent (KubeRay CRDs not available)")
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_crd(path: Path):
    import jsonschema

    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    jsonschema.validate(doc, _schema(doc["kind"]))


def test_there_are_manifests_and_a_bad_one_is_caught():
    assert {p.name for p in MANIFESTS} >= {"raycluster.yaml", "rayjob.yaml"}
    if not CRDS.is_dir():
        pytest.skip("../shared/kuberay-crds is absent")
    import jsonschema

    doc = yaml.safe_load((ROOT / "cluster" / "raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, _schema("RayCluster"))


def test_gpu_check_ends_at_once_with_one_line_where_there_is_no_gpu():
    """benchmarks/gpu_check.sh, for the day a device is lent: here (no NVIDIA driver) it must fail clearly, not hang."""
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has an NVIDIA driver: run benchmarks/gpu_check.sh itself")
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("gpu_check: driver: nvidia-smi not found")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ok"] is False and report["failed"] == "driver"
