"""`m3 serve` against a real server on loopback, through the `openai` client package: what it
answers equals `m3 generate`'s engine token for token (with memory and without, streamed or
not); what the client gets wrong is a 4xx naming it; requests that arrive together are decoded
together (tests/jobs/serve/conftest.py: the server and the bank)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import openai
import pytest

from jobs.inference.engine import Inference
from jobs.inference.generate import describe

pytestmark = pytest.mark.slow

PROMPTS = ["Q: In which region is Shyzer?\nA:", "Q: When was Shyzer founded?\nA:", "Shyzer is a town"]


@pytest.fixture(scope="module")
def engine(server):
    """`m3 generate`'s engine on the same config (the live build)."""
    return Inference(server.cfg)


def post(url: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("mode", ["memory", "none"])
def test_completions_equal_m3_generate_greedy_token_for_token(client, server, engine, mode):
    for prompt in PROMPTS:
        want = engine.generate([prompt], mode, max_new_tokens=24, temperature=0.0)[0]
        got = client.completions.create(
            model=server.model, prompt=prompt, max_tokens=24, temperature=0, extra_body={"mode": mode, "memories": True}
        )
        choice = got.choices[0]
        assert choice.model_extra["token_ids"] == want.tokens, prompt
        assert choice.text == want.text
        assert choice.model_extra["memories"] == describe(engine, want)["chunks"]
        assert choice.finish_reason == ("stop" if len(want.tokens) < 24 else "length")
        assert got.model_extra["build"] == 2 and got.usage.completion_tokens == len(want.tokens)
    if mode == "memory":  # the memories read are the bank's: each chunk read some
        assert all(c["refs"] for c in choice.model_extra["memories"])


def test_sampling_parameters_are_m3_generate_s(client, server, engine):
    """temperature, top_p and seed sample what the engine samples with that seed."""
    prompt = PROMPTS[0]
    want = engine.generate([prompt], max_new_tokens=16, temperature=0.9, top_p=0.8, seeds=[7])[0]
    got = client.completions.create(
        model=server.model, prompt=prompt, max_tokens=16, temperature=0.9, top_p=0.8, seed=7
    ).choices[0]
    assert got.model_extra["token_ids"] == want.tokens
    other = client.completions.create(
        model=server.model, prompt=prompt, max_tokens=16, temperature=0.9, top_p=0.8, seed=8
    ).choices[0]
    assert other.model_extra["token_ids"] != want.tokens  # the seed is used, not ignored


def test_streaming_sends_the_same_text_piece_by_piece(client, server, engine):
    want = engine.generate([PROMPTS[1]], max_new_tokens=20)[0]
    chunks = list(client.completions.create(model=server.model, prompt=PROMPTS[1], max_tokens=20, stream=True))
    assert len(chunks) > 2 and "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert {c.model_extra["build"] for c in chunks} == {2}
    chat = list(
        client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=20, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chat) == want.text


def test_a_stream_sends_each_token_s_text_as_it_comes(client, server):
    """One content event per token (a token ending inside a character adds its text to the next),
    concatenating to the non-streamed greedy answer, completions and chat alike."""
    for prompt in PROMPTS:
        whole = client.completions.create(model=server.model, prompt=prompt, max_tokens=24, temperature=0)
        n, text = len(whole.choices[0].model_extra["token_ids"]), whole.choices[0].text
        assert n > 1, prompt
        chunks = list(
            client.completions.create(model=server.model, prompt=prompt, max_tokens=24, temperature=0, stream=True)
        )
        deltas = [c.choices[0].text for c in chunks if c.choices[0].text]
        assert "".join(deltas) == text and len(deltas) >= n / 2, (prompt, deltas)
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == n
        chat = list(
            client.chat.completions.create(
                model=server.model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=24,
                temperature=0,
                stream=True,
            )
        )
        deltas = [c.choices[0].delta.content for c in chat if c.choices[0].delta.content]
        assert "".join(deltas) == text and len(deltas) >= n / 2, (prompt, deltas)
        assert chat[0].choices[0].delta.role == "assistant" and chat[-1].choices[0].finish_reason is not None


def test_a_stream_gets_its_tokens_while_its_batch_still_decodes(server, engine):
    """The replica's path (batcher, run_batch, TokenStream) with the model held at its first
    decode step (the forward after the prefill) until the streamed request has its first token:
    a stream sent once the decode ended would never release it. The streamed row asks fewer
    tokens than the other row of its batch: its stream ends at its own max_tokens, as its
    non-streamed answer does."""
    import asyncio

    from jobs.serve.batch import run_batch
    from jobs.serve.batcher import Batcher
    from jobs.serve.protocol import Job
    from jobs.serve.stream import TokenStream

    prompt, ic = PROMPTS[1], server.cfg.infer
    short, long = (engine.generate([prompt], max_new_tokens=n, temperature=0.0)[0] for n in (5, 24))
    assert len(short.tokens) == 5 and len(long.tokens) > 5  # the test needs both cuts
    released, held, calls = threading.Event(), [], []

    def hold(module, args):
        calls.append(1)
        if len(calls) == 2:  # the prefill sampled the first tokens; this forward decodes the next
            held.append(released.wait(30))  # False: the first token never reached the request

    async def main():
        batcher = Batcher(lambda jobs: run_batch(engine, 2, jobs), max_size=8, wait_s=0.5)

        async def request(max_tokens: int):
            job = Job(prompt, max_tokens, 0.0, 1.0, ic.seed, ic.mode, stream=True)
            job.stream_to = TokenStream(max_tokens)
            task = asyncio.ensure_future(batcher.submit(job))
            task.add_done_callback(job.stream_to.close)
            assert await job.stream_to.started()
            released.set()
            deltas = [d async for d in job.stream_to.deltas(lambda: task.result().text)]
            return deltas, await task

        got = await asyncio.gather(request(5), request(24))
        return got, batcher.sizes

    handle = engine.model.register_forward_pre_hook(hold)
    try:
        ((deltas5, result5), (deltas24, result24)), sizes = asyncio.run(main())
    finally:
        handle.remove()
    assert held == [True] and sizes == [2]
    assert "".join(deltas5) == short.text and result5.token_ids == short.tokens and result5.finish_reason == "length"
    assert "".join(deltas24) == long.text and result24.token_ids == long.tokens and len(deltas5) < len(deltas24)


def test_chat_completion_continues_the_messages(client, server, engine):
    messages = [{"role": "system", "content": "Facts."}, {"role": "user", "content": PROMPTS[0]}]
    want = engine.generate(["Facts.\n" + PROMPTS[0]], max_new_tokens=12)[0]
    got = client.chat.completions.create(model=server.model, messages=messages, max_tokens=12)
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [server.model]
    with urllib.request.urlopen(f"{server.url}/health", timeout=10) as r:
        health = json.loads(r.read())
    assert r.status == 200 and health["status"] == "ok" and health["build"] == 2


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b'{"model": "facts-tiny", "prompt": ', 400, "the request body is not valid JSON"),
        (b"[1, 2]", 400, "the request body must be a JSON object"),
        (b'{"model": "gpt-4", "prompt": "a"}', 404, "model: no model 'gpt-4' here (this server serves 'facts-tiny')"),
        (b'{"prompt": "a"}', 400, "model: expected the model's name"),
        (b'{"model": "facts-tiny", "prompt": "a", "max_tokens": 0}', 400, "max_tokens: expected a value >= 1"),
        (b'{"model": "facts-tiny", "prompt": "a", "max_tokens": 9999}', 400, "and <= 511, got 9999"),
        (b'{"model": "facts-tiny", "prompt": "a", "max_tokens": "8"}', 400, "max_tokens: expected an integer"),
        (b'{"model": "facts-tiny", "prompt": "a", "temperature": -1}', 400, "temperature: expected a value >= 0"),
        (b'{"model": "facts-tiny", "prompt": "a", "n": 2}', 400, "n: not supported by this server"),
        (b'{"model": "facts-tiny", "prompt": "a", "mode": "x"}', 400, "mode: expected one of memory, none, rag"),
        (b'{"model": "facts-tiny", "prompt": 5}', 400, "prompt: expected a string"),
        (b'{"model": "facts-tiny", "messages": []}', 400, "messages: expected a non-empty list"),
    ],
)
def test_bad_requests_are_4xx_with_a_message(server, body, status, words):
    route = "chat/completions" if b"messages" in body else "completions"
    code, answer = post(f"{server.url}/v1/{route}", body)
    assert code == status and words in answer["error"]["message"], answer


def test_a_prompt_longer_than_the_context_is_400_naming_it(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt="Shyzer " * 600, max_tokens=8)
    assert e.value.status_code == 400
    assert "exceed the model's context of 512 tokens" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="a", max_tokens=8)


def test_requests_arriving_together_are_decoded_together(client, server, engine):
    """8 clients at once: one decode serves several (batch > 1), each row the tokens alone."""
    want = {p: engine.generate([p], max_new_tokens=16)[0].tokens for p in PROMPTS}
    got, errors = [], []

    def one(prompt):
        try:
            r = client.completions.create(model=server.model, prompt=prompt, max_tokens=16)
            got.append((prompt, r.choices[0].model_extra["token_ids"]))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(PROMPTS[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 8
    assert all(tokens == want[p] for p, tokens in got)
    with urllib.request.urlopen(f"{server.url}/health", timeout=10) as r:
        assert json.loads(r.read())["largest_batch"] > 1


def test_a_token_is_asked_for_when_one_is_set(server):
    """The same application with a token (what a non-loopback host requires), beside the first."""
    from ray import serve

    from jobs.serve.app import application

    serve.run(application(server.cfg, "s3cret"), name="m3-token", route_prefix="/token", blocking=False)
    try:
        base = f"{server.url}/token/v1"
        wrong = openai.OpenAI(base_url=base, api_key="guess", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.completions.create(model=server.model, prompt="a", max_tokens=2)
        assert "a valid token is required" in e.value.body["message"]
        right = openai.OpenAI(base_url=base, api_key="s3cret", max_retries=0, timeout=60)
        assert right.completions.create(model=server.model, prompt="a", max_tokens=2).choices[0].text is not None
        assert [m.id for m in right.models.list().data] == [server.model]
    finally:
        serve.delete("m3-token")


def test_one_log_line_per_request(client, server):
    import glob
    import os
    import time

    import ray

    client.completions.create(model=server.model, prompt="Shyzer", max_tokens=3)
    post(f"{server.url}/v1/completions", b'{"model": "nope", "prompt": "a"}')
    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "serve")
    deadline = time.monotonic() + 20
    while True:
        text = "".join(open(f, errors="replace").read() for f in glob.glob(f"{logs}/replica_m3_m3_*.log"))
        ok = "route=completions status=200 build=2 new_tokens=" in text and "status=404 build=None" in text
        if ok or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert ok, text[-2000:]


def test_metrics_reach_ray_s_prometheus_export(client, server):
    """Latency, tokens/s, batch size, memory-cache hit rate and build, as Ray's metrics agent
    exports them (Prometheus text, names prefixed `ray_`)."""
    import time

    import ray

    client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=4)
    port = ray._private.worker._global_node.metrics_export_port
    want = ["request_latency_s_count", "tokens_per_s", "batch_size_count", "memory_cache_hit_rate", "build"]
    deadline, found = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        lines = [line for line in text.splitlines() if 'application="m3"' in line]  # not m3-token's
        found = {w: line for w in want for line in lines if line.startswith(f"ray_m3_serve_{w}{{")}
        if len(found) == len(want) and found["build"].endswith(" 2.0"):
            break
        time.sleep(1)
    assert sorted(found) == sorted(want), sorted(found)
    assert found["build"].endswith(" 2.0")
    assert float(found["request_latency_s_count"].rsplit(" ", 1)[1]) >= 1


# last in this module: it publishes a new live build into the served bank
def test_a_publish_during_a_burst_drops_no_request_and_mixes_no_builds(client, server):
    """6 clients send requests back to back; build 1's tables are published again as the live
    build (3: a rollback of the edit, through the manifest every publisher writes) while they
    do. Every request answers; each names one build and equals, tokens and memories read, what
    that build's engine generates alone; a client never goes back to the old build."""
    from storage.bank import Bank
    from storage.builds import resolve_build
    from storage.live import publish

    bank = Bank.of(server.cfg)
    old = {p: _expect(Inference(server.cfg, build=2), p) for p in PROMPTS}
    new = {p: _expect(Inference(server.cfg, build=1), p) for p in PROMPTS}
    assert any(old[p] != new[p] for p in PROMPTS)  # else a mixed answer could not be told apart
    seen, errors, stop = [], [], threading.Event()

    def burst(k):
        i = 0
        while not stop.is_set():
            prompt = PROMPTS[(k + i) % len(PROMPTS)]
            i += 1
            try:
                r = client.completions.create(
                    model=server.model, prompt=prompt, max_tokens=8, extra_body={"memories": True}
                )
                c = r.choices[0]
                seen.append(
                    (k, r.model_extra["build"], prompt, (c.model_extra["token_ids"], c.model_extra["memories"]))
                )
            except Exception as e:  # noqa: BLE001 - the assertion reports them
                errors.append(repr(e))

    threads = [threading.Thread(target=burst, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: len(seen) >= 12, 60)
        manifest = publish(bank, resolve_build(bank, 1)["versions"], {"by": "tests/jobs/serve: rollback"})
        assert manifest["build"] == 3
        n = len(seen)
        _wait(lambda: sum(1 for s in seen[n:] if s[1] == 3) >= 12, 90)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert {b for _, b, _, _ in seen} == {2, 3}
    for k, build, prompt, got in seen:
        assert got == (old if build == 2 else new)[prompt], (build, prompt)
    for k in range(6):
        builds = [b for kk, b, _, _ in seen if kk == k]
        assert builds == sorted(builds), f"client {k} went back to the old build: {builds}"


def _expect(inference, prompt: str):
    out = inference.generate([prompt], max_new_tokens=8)[0]
    return out.tokens, describe(inference, out)["chunks"]


def _wait(condition, timeout_s: float) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# after the burst: the live build is 3
def test_a_build_that_cannot_be_served_leaves_the_served_one_in_place(client, server):
    """A published build naming a memories version that does not exist (retention deleted it, say):
    the replica logs it, keeps serving build 3 and says so in /health; no request fails."""
    from storage.bank import Bank
    from storage.live import publish, read_manifest

    bank = Bank.of(server.cfg)
    versions = dict(read_manifest(bank)["versions"])
    with pytest.raises(RuntimeError, match="version main:999 does not exist"):  # moving the tag, after
        publish(bank, {**versions, "memories": 999}, {"by": "tests/jobs/serve: broken"})
    assert read_manifest(bank)["build"] == 4  # the manifest, the commit point, names the broken build

    def health():
        with urllib.request.urlopen(f"{server.url}/health", timeout=10) as r:
            return json.loads(r.read())

    _wait(lambda: "4" in health()["failed_builds"], 60)
    h = health()
    assert h["build"] == 3 and "999" in h["failed_builds"]["4"], h
    r = client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=4)
    assert r.model_extra["build"] == 3
