"""Ray nodes started on this machine with ``ray start --block``, for the two-node cluster test
and benchmark (``tests/integration/test_ray_cluster.py``, ``benchmarks/ray_cluster_scaling.py``).

Each node runs in its own process group, so a caller stops exactly the Ray processes it
started, never with ``ray stop`` (which would stop every Ray on the machine). Ray's own
``ray.cluster_utils.Cluster`` starts nodes in one Python process and does not separate them as
two machines would; a separate ``ray start`` per node does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def start_node(*args: str) -> subprocess.Popen:
    """``ray start --block --node-ip-address=127.0.0.1 <args>``; a head should get its own
    ``--temp-dir``: ``ray start --head`` writes its address there, where a later plain
    ``ray.init()`` elsewhere on the machine would otherwise find it and try to join."""
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    return subprocess.Popen([ray_cli, "start", "--block", "--node-ip-address=127.0.0.1",
                             "--disable-usage-stats", *args],
                            env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def stop_node(node: subprocess.Popen) -> None:
    """SIGTERM the node's process group, SIGKILL it after 30 s."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(node.pid, sig)
            node.wait(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def wait_for_nodes(address: str, count: int, timeout_s: float) -> None:
    """Return once the cluster at ``address`` has ``count`` live nodes; TimeoutError after
    ``timeout_s``."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            alive = sum(node["Alive"] for node in ray.nodes())
            ray.shutdown()
            if alive >= count:
                return
        except ConnectionError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{count} Ray nodes at {address} did not come up in {timeout_s:g}s")
