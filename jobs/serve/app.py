"""The Ray Serve deployment of `m3 serve`: an OpenAI-compatible HTTP API over the model and the
live build of its bank.

    GET  /health                 200 once a build is loaded: the build served, switches, failures
    GET  /v1/models              the one model this server serves
    POST /v1/completions         OpenAI completions (stream or not)
    POST /v1/chat/completions    OpenAI chat completions (stream or not)

Requests are validated here (jobs/serve/protocol.py; a 4xx naming the field for anything the
client got wrong), then queued to the replica's batcher (jobs/serve/batcher.py), which hands
`_decode` the requests that arrived together (at most serve.max_batch_size); the batch is decoded
in one thread by the replica's engine for the build it serves (jobs/serve/builds.py), so the
memory store, its RAM cache and the retriever are shared by every request of the replica.
Streaming sends each token's text as soon as the decode step that sampled it ends (the engine's
`on_token`, jobs/serve/stream.py), cut where the non-streamed answer is (EOS, the request's own
max_tokens); a request the batch refuses (its prompt too long) is answered with its 4xx before
any event.

Each request logs one line (the replica's log, `ray.serve` logger): route, build, tokens,
batch size, latency. Metrics, exported by Ray's metrics agent (Prometheus) with the deployment's
tags: m3_serve_request_latency_s, m3_serve_tokens_per_s, m3_serve_batch_size,
m3_serve_memory_cache_hit_rate, m3_serve_build, m3_serve_requests (by status).
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) as
# objects, and Ray ships this class by value, without the module globals a string would name
import asyncio
import hmac
import logging
import os
import time

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from jobs.serve.batch import run_batch
from jobs.serve.batcher import Batcher
from jobs.serve.builds import LiveBuild
from jobs.serve.protocol import RequestError, check_model, completion, parse_body, parse_job, stream_events
from jobs.serve.stream import TokenStream

log = logging.getLogger("ray.serve")
api = FastAPI(title="m3 serve")


def _metrics():
    return {
        "latency": Histogram(
            "m3_serve_request_latency_s",
            description="seconds from a request's arrival to its whole answer",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64],
            tag_keys=("route",),
        ),
        "tokens_per_s": Gauge("m3_serve_tokens_per_s", description="new tokens per second of the last batch's decode"),
        "batch": Histogram(
            "m3_serve_batch_size", description="requests decoded together", boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 32]
        ),
        "hit_rate": Gauge("m3_serve_memory_cache_hit_rate", description="the memory store's RAM cache hit rate"),
        "build": Gauge("m3_serve_build", description="the published build this replica serves"),
        "requests": Counter("m3_serve_requests", description="requests answered", tag_keys=("route", "status")),
    }


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@serve.deployment(name="m3")
@serve.ingress(api)
class M3Server:
    def __init__(self, cfg, token):
        sc = cfg.serve
        # Ray gives a worker OMP_NUM_THREADS = its CPUs (often 1); a decode as fast as `m3
        # generate`'s needs torch's threads for this machine unless serve.threads says otherwise
        torch.set_num_threads(sc.threads or _cores())
        self.cfg, self.token, self.model = cfg, token, sc.model_name or cfg.name
        self.live = LiveBuild(cfg, sc.build_poll_s)
        self.batcher = Batcher(self._decode, sc.max_batch_size, sc.batch_wait_s)  # one decode at a time
        self.metrics = _metrics()
        self.metrics["build"].set(self.live.current.build or 0)
        self.served = self.largest_batch = 0

    # -- routes
    @api.get("/health")
    async def health(self) -> dict:
        cur = self.live.current
        return {
            "status": "ok",
            "build": cur.build,
            "model": self.model,
            "model_hash": cur.inference.model_hash,
            "switches": self.live.switches,
            "failed_builds": self.live.failed,
            "requests": self.served,
            "largest_batch": self.largest_batch,
            "threads": torch.get_num_threads(),
        }

    @api.get("/v1/models")
    async def models(self, request: Request):
        if (denied := self._auth(request)) is not None:
            return denied
        cur = self.live.current
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model,
                    "object": "model",
                    "created": int(cur.loaded_at),
                    "owned_by": "m3",
                    "build": cur.build,
                }
            ],
        }

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._answer(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._answer(request, chat=True)

    # -- the work
    async def _answer(self, request: Request, chat: bool):
        route = "chat" if chat else "completions"
        t0 = time.perf_counter()
        try:
            if (denied := self._auth(request)) is not None:
                return denied
            body = parse_body(await request.body())
            check_model(body, self.model)
            header = request.headers.get("x-m3-memories", "").lower() in ("1", "true", "yes")
            job = parse_job(body, self.cfg.infer, self._max_seq_len(), chat, header)
            if job.stream:
                return await self._stream(job, route, t0)
            result, batch = await self.batcher.submit(job)
            if isinstance(result, RequestError):
                raise result
        except RequestError as e:
            self._done(route, e.status, t0, None, 0, 0, e.message)
            return JSONResponse(e.body(), status_code=e.status)
        headers = {"X-M3-Build": str(result.build)}
        self._done(route, 200, t0, result.build, len(result.token_ids), batch, None)
        return JSONResponse(completion(job, result.as_dict(), self.model), headers=headers)

    async def _stream(self, job, route: str, t0: float):
        """The events of a streamed job, each token's text as its decode step ends; its
        RequestError (raised) when the batch refuses it, before any event."""
        stream = job.stream_to = TokenStream(job.max_tokens)
        task = asyncio.ensure_future(self.batcher.submit(job))
        task.add_done_callback(stream.close)
        if not await stream.started():  # decoded without a token: an error, or an empty answer
            result, _ = task.result()
            if isinstance(result, RequestError):
                raise result

        def final() -> dict:
            result, batch = task.result()
            self._done(route, 200, t0, result.build, len(result.token_ids), batch, None)
            return result.as_dict()

        deltas = stream.deltas(lambda: task.result()[0].text)
        events = stream_events(job, self.model, stream.build, deltas, final)
        return StreamingResponse(events, media_type="text/event-stream", headers={"X-M3-Build": str(stream.build)})

    def _decode(self, jobs: list) -> list:
        """The requests that arrived together, decoded by one build in one engine call (in the
        batcher's thread)."""
        served = self.live.serving()
        t0 = time.perf_counter()
        results = run_batch(served.inference, served.build, jobs)
        seconds = time.perf_counter() - t0
        new = sum(len(r.token_ids) for r in results if not isinstance(r, RequestError))
        self.metrics["batch"].observe(len(jobs))
        self.largest_batch = max(self.largest_batch, len(jobs))
        self.metrics["tokens_per_s"].set(new / seconds if seconds > 0 else 0.0)
        self.metrics["build"].set(served.build or 0)
        store = served.inference._store
        if store is not None and store.hits + store.misses:
            self.metrics["hit_rate"].set(store.hits / (store.hits + store.misses))
        return [(r, len(jobs)) for r in results]

    def _auth(self, request: Request):
        if not self.token:
            return None
        given = request.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            return None
        e = RequestError(401, "a valid token is required: Authorization: Bearer <serve.token>", code="invalid_api_key")
        return JSONResponse(e.body(), status_code=401)

    def _max_seq_len(self) -> int:
        return self.live.current.inference.model.config.max_seq_len

    def _done(self, route, status, t0, build, tokens, batch, error) -> None:
        latency = time.perf_counter() - t0
        self.served += 1
        self.metrics["requests"].inc(tags={"route": route, "status": str(status)})
        if status == 200:
            self.metrics["latency"].observe(latency, tags={"route": route})
        log.info(
            "m3 serve: route=%s status=%s build=%s new_tokens=%s batch=%s latency_ms=%.1f%s",
            route,
            status,
            build,
            tokens,
            batch,
            latency * 1000,
            f" error={error!r}" if error else "",
        )


def application(cfg, token: str | None):
    """The Serve application of a config: its replicas, each holding one build's engine."""
    sc = cfg.serve
    return M3Server.options(
        num_replicas=sc.replicas,
        # a batch needs its requests in the replica at once: Serve's default (5) would cap it
        max_ongoing_requests=max(2 * sc.max_batch_size, 16),
        ray_actor_options={"num_cpus": sc.replica_cpus},
    ).bind(cfg, token)
