"""Starting `m3 serve`: Ray (embedded by default, or the config's `ray.address`), Ray Serve's
HTTP proxy on serve.host:serve.port, the application (jobs/serve/app.py), and waiting until the
first request can be answered. `run` then blocks until SIGINT/SIGTERM and shuts Serve down.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

from jobs.config.serve import TOKEN_ENV
from jobs.runtime import init_ray
from model.errors import M3Error

APP = "m3"


class ServeError(M3Error, RuntimeError):
    pass


def _free_port(host: str) -> int:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start(cfg, timeout_s: float = 300.0) -> str:
    """Start the server of `cfg` and return its base URL once /health answers 200."""
    from ray import serve

    from jobs.serve.app import application

    sc = cfg.serve
    token = sc.token or os.environ.get(TOKEN_ENV) or None
    sc.check_exposure(token)
    init_ray(cfg.ray)
    port = sc.port or _free_port(sc.host)
    serve.start(http_options={"host": sc.host, "port": port})
    serve.run(application(cfg, token), name=APP, route_prefix="/", blocking=False)
    host = f"[{sc.host}]" if ":" in sc.host else sc.host
    if sc.host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    url = f"http://{host}:{port}"
    wait_healthy(url, timeout_s)
    return url


def wait_healthy(url: str, timeout_s: float) -> dict:
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = e
        time.sleep(0.2)
    raise ServeError(f"m3 serve: {url}/health did not answer within {timeout_s:.0f} s (last: {last})")


def stop() -> None:
    from ray import serve

    serve.delete(APP)
    serve.shutdown()


def run(cfg) -> int:
    """`m3 serve`: start, print where, serve until SIGINT/SIGTERM."""
    t0 = time.perf_counter()
    url = start(cfg)
    print(
        f"m3 serve: {url} (model {cfg.serve.model_name or cfg.name}) ready in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    print(f"m3 serve: try  curl {url}/v1/models", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    print("m3 serve: shutting down", flush=True)
    stop()
    return 0
