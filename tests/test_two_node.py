"""Full-weight sync to an engine on another Ray node. A module of its own, so that it runs after the other rollout
tests have shut their engines down (three float32 engines plus this test's own cluster came close to this
machine's 24 GiB)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.long  # a second Ray node
def test_full_sync_reaches_an_engine_on_another_node(model_path, tmp_path):
    """Two Ray nodes on this machine (in a process of its own): the engine copies the buckets it cannot see, and
    takes a broadcast without copies."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("two_node_sync.py")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = tmp_path / "seen.json"
    done = subprocess.run([sys.executable, str(script), model_path, str(result)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    seen = json.loads(result.read_text())
    assert seen["engine_node"] != seen["driver_node"] and seen["copied_bytes"] > 100e6
    assert len(seen["broadcast_seconds"]) == 2
