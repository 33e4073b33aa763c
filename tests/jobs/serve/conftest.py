"""One real server for the `m3 serve` tests: Ray Serve on loopback (a free port), in the session's
embedded Ray, serving a copy of the edited facts bank (tests/conftest.py: build 1,
then build 2 with edited descriptions, encoded by a tiny reader model): the tests may publish
into the copy without touching the bank other tests read."""

from __future__ import annotations

import shutil
import types

import pytest


@pytest.fixture(scope="module")
def server(edited_facts_bank, tmp_path_factory):
    from jobs.config import load_config
    from jobs.serve import server as srv

    eb = edited_facts_bank
    bank = tmp_path_factory.mktemp("served") / "bank"
    shutil.copytree(eb.root / "bank", bank)
    sets = [
        *eb.sets2,
        f"bank.uri={bank}",
        "serve.port=0",
        "serve.model_name=facts-tiny",
        "serve.replica_cpus=0.5",
        "serve.build_poll_s=0.2",
        "serve.batch_wait_s=0.05",
    ]
    cfg = load_config("configs/facts.yaml", sets)
    url = srv.start(cfg, timeout_s=120)
    yield types.SimpleNamespace(url=url, cfg=cfg, sets=sets, model="facts-tiny", eb=eb)
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
