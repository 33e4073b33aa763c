"""The embedded Ray listens on loopback only: nothing of it is reachable from the network."""

import os

import psutil
import pytest


@pytest.mark.slow
def test_embedded_ray_listens_on_loopback_only(ray_local):
    node = ray_local._private.worker._global_node
    assert node.node_ip_address == "127.0.0.1" and node.gcs_address.startswith("127.0.0.1:")
    ray_local.get(ray_local.remote(lambda: 1).remote())  # a worker process exists
    session = {os.getpid()}
    for p in psutil.process_iter(["pid", "cmdline"]):
        if node.session_name in " ".join(p.info["cmdline"] or []) or node.gcs_address in " ".join(
            p.info["cmdline"] or []
        ):
            session.add(p.info["pid"])
    for pid in list(session):
        try:
            session |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
        except psutil.Error:
            pass
    listening = [c.laddr for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.pid in session]
    assert listening
    exposed = [a for a in listening if a.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, f"Ray listens beyond loopback: {exposed}"


DASHBOARD_ON_DEMAND = """
from jobs.config import RayConfig
from jobs.runtime import dashboard_url, init_ray

cfg = RayConfig(num_cpus=1)
ray = init_ray(cfg, dashboard=False)
first = ray.get_runtime_context().get_node_id()
print("bare", dashboard_url())
init_ray(cfg, dashboard=False)
print("kept", ray.get_runtime_context().get_node_id() == first)
init_ray(cfg)
print("restarted", ray.get_runtime_context().get_node_id() != first, dashboard_url() is not None)
ray.shutdown()
"""


@pytest.mark.slow
def test_a_cluster_started_without_the_dashboard_is_restarted_with_it_for_who_needs_it():
    """Ingest starts Ray without the dashboard; training after it in the same process (`m3 run`)
    needs one (Ray Train's State API) and gets the cluster restarted with it."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = subprocess.run(
        [sys.executable, "-c", DASHBOARD_ON_DEMAND], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:3] == ["bare None", "kept True", "restarted True True"], out.stdout
