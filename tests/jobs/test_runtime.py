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
        if node.session_name in " ".join(p.info["cmdline"] or []) or node.gcs_address in " ".join(p.info["cmdline"] or []):
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
