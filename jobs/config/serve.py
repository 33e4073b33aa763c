"""The `serve:` section of the pipeline YAML: `m3 serve` (jobs/serve), the model and its bank behind
an OpenAI-compatible HTTP API on Ray Serve.

Checked like every section (model.checked): a non-loopback host without a token fails at load
time naming `serve.token`, since the API then answers anyone who can reach the port.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from model.checked import FieldError, check_fields

TOKEN_ENV = "M3_SERVE_TOKEN"  # the token from the environment: a config file is often committed


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeConfig:
    # Where Ray Serve's HTTP proxy listens. Loopback by default: anything else needs a token.
    host: str = "127.0.0.1"
    # 0 = a free port, printed at start (tests and several servers on one machine).
    port: int = field(default=8000, metadata={"ge": 0, "le": 65535})
    # Clients send `Authorization: Bearer <token>`; null = $M3_SERVE_TOKEN, else no token
    # (allowed on loopback only).
    token: str | None = None
    # The model id clients name (/v1/models); null = the config's `name`.
    model_name: str | None = None
    # Replicas of the deployment: each holds the model, the memory store and the retriever of
    # the live build, shared by the requests it serves.
    replicas: int = field(default=1, metadata={"ge": 1})
    # CPUs Ray reserves for each replica (fractions allowed: the decode's torch threads are
    # set by `threads`, not by this).
    replica_cpus: float = field(default=1.0, metadata={"ge": 0})
    # torch threads of a replica's decode; null = torch's default for this machine (what
    # `m3 generate` uses), so one request is as fast as `m3 generate`.
    threads: int | None = field(default=None, metadata={"ge": 1})
    # Requests that arrive together are decoded as one batch of at most max_batch_size, closed
    # when the decoder is free; it waits at most batch_wait_s for as many requests as were active
    # around the last batch (one client alone never waits: jobs/serve/batcher.py).
    max_batch_size: int = field(default=8, metadata={"ge": 1})
    batch_wait_s: float = field(default=0.1, metadata={"ge": 0})
    # How often (at most) a replica reads the live manifest between batches to see whether
    # a new build was published; it loads the new build beside the old one and switches
    # between two batches.
    build_poll_s: float = field(default=0.5, metadata={"gt": 0})

    def __post_init__(self):
        check_fields(self)
        if self.token is not None and not self.token.strip():
            raise FieldError("token", "a non-empty string or null", self.token)

    def check_exposure(self, token: str | None) -> None:
        """A server reachable from other machines must ask for a token (here, not at load time:
        the token may come from the environment)."""
        if not is_loopback(self.host) and not token:
            raise FieldError(
                "serve.token",
                f"a token when serve.host is not loopback ({self.host}): set serve.token or ${TOKEN_ENV}",
            )
