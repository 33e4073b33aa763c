"""`m3 serve` as a user runs it: a process with its own embedded Ray that prints its URL, answers,
and shuts down on SIGINT with rc 0; a non-loopback host without a token is refused before any
work, in one line naming the key."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from jobs.config.serve import TOKEN_ENV
from tests.conftest import ROOT


def sets(eb) -> list[str]:
    return [a for s in [*eb.sets2, "serve.port=0", "serve.model_name=facts-tiny"] for a in ("--set", s)]


@pytest.mark.long  # a whole Ray start and stop: ~30-60 s on 2 cores
def test_m3_serve_starts_answers_and_stops_on_sigint(edited_facts_bank):
    cmd = [sys.executable, "-m", "jobs", "serve", "-c", "configs/facts.yaml", *sets(edited_facts_bank)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = None, time.monotonic() + 240
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, f"m3 serve exited with {proc.returncode}"
            if m := re.match(r"m3 serve: (http://127\.0\.0\.1:\d+) \(model facts-tiny\) ready in", line):
                url = m.group(1)
        assert url, "m3 serve printed no URL"
        body = json.dumps({"model": "facts-tiny", "prompt": "Shyzer is", "max_tokens": 4}).encode()
        req = urllib.request.Request(f"{url}/v1/completions", body, {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        assert r.headers["X-M3-Build"] == "2" and answer["build"] == 2 and answer["choices"][0]["token_ids"]
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(120)
    assert rc == 0


@pytest.mark.slow
def test_m3_serve_off_loopback_without_a_token_is_refused(edited_facts_bank):
    cmd = [sys.executable, "-m", "jobs", "serve", "-c", "configs/facts.yaml", *sets(edited_facts_bank)]
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    out = subprocess.run([*cmd, "--host", "0.0.0.0"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2
    assert "m3 serve: error: serve.token: a token when serve.host is not loopback (0.0.0.0)" in out.stderr
    assert "Traceback" not in out.stderr
