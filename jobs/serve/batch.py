"""One decode for the requests that arrived together, through the engine `m3 generate` uses
(jobs/inference/engine.py `Inference.generate_tokens`), never a second decoder.

Requests that sample alike (same mode, temperature and top_p) go to one `generate_tokens` call
with each request's own seed, for as many tokens as the longest asks; each row is then cut to
its own max_tokens. That cut is exact: a row's tokens depend only on its context, its seed and
the steps before (a KV cache sized for more tokens holds the same values), so a request gets the
tokens `m3 generate --max-new-tokens N` gives it alone. The engine decodes rows of equal context
length together (the model takes no padding mask): prompts of other lengths are decoded one
length after another inside the same call.

A streamed request (its Job's `stream_to`, jobs/serve/stream.py) gets each token of its row as
soon as the decode step that sampled it ends, cut as its Result is (at EOS, at its max_tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from jobs.inference.generate import describe
from jobs.serve.protocol import Job, RequestError
from model.generation import clip_reads


@dataclass
class Result:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS) or "length"
    build: int | None
    memories: list[dict] | None = None

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _clip(out, keep: int, eos_id: int):
    """The Output of a row cut to `keep` new tokens, its reads clipped as a decode of exactly
    that many tokens clips them (model/generation.py: to the last token fed)."""
    stopped = len(out.tokens) < keep  # EOS came first
    tokens = out.tokens[:keep]
    end = len(out.prompt_tokens) + (len(tokens) + 1 if stopped else keep)
    return type(out)(out.prompt_tokens, tokens, out.text, out.mode, clip_reads(out.reads, end), out.rag_refs), stopped


def prompt_tokens(inference, job: Job) -> list[int]:
    """The job's prompt as the model reads it (behind EOS, as `m3 generate` encodes it), checked
    against the model's context: RequestError 400 when prompt + max_tokens does not fit."""
    ids = inference.encode(job.prompt)
    limit = inference.model.config.max_seq_len
    if len(ids) + job.max_tokens > limit:
        raise RequestError(
            400,
            f"prompt: {len(ids)} tokens + max_tokens {job.max_tokens} exceed the model's context of {limit} "
            f"tokens: shorten the prompt or max_tokens",
            "prompt",
            "context_length_exceeded",
        )
    return ids


def run_batch(inference, build: int | None, jobs: list[Job]) -> list[Result | RequestError]:
    """Each job's Result (or its RequestError), all decoded by `inference`, the one build."""
    results: list[Result | RequestError | None] = [None] * len(jobs)
    groups: dict[tuple, list[tuple[int, list[int]]]] = {}
    for i, job in enumerate(jobs):
        try:
            ids = prompt_tokens(inference, job)
        except RequestError as e:
            results[i] = e
            continue
        groups.setdefault((job.mode, job.temperature, job.top_p), []).append((i, ids))
    eos = inference.model.config.eos_id
    for i, job in enumerate(jobs):
        if job.stream_to is not None and results[i] is None:
            job.stream_to.open(build, inference.tokenizer, eos)
    for (mode, temperature, top_p), rows in groups.items():
        n = max(jobs[i].max_tokens for i, _ in rows)
        streams = {p: jobs[i].stream_to for p, (i, _) in enumerate(rows) if jobs[i].stream_to is not None}

        def on_token(p: int, token: int, streams=streams) -> None:
            if p in streams:
                streams[p].push(token)

        outs = inference.generate_tokens(
            [ids for _, ids in rows],
            mode,
            max_new_tokens=n,
            temperature=temperature,
            top_p=top_p,
            seeds=[jobs[i].seed for i, _ in rows],
            batch_size=len(rows),
            on_token=on_token if streams else None,
        )
        for (i, ids), out in zip(rows, outs):
            job = jobs[i]
            out, stopped = _clip(out, job.max_tokens, eos)
            text = inference.tokenizer.decode(out.tokens)
            out.text = text
            results[i] = Result(
                text=text,
                token_ids=list(out.tokens),
                prompt_tokens=len(ids),
                finish_reason="stop" if stopped else "length",
                build=build,
                memories=describe(inference, out)["chunks"] if job.memories else None,
            )
    return results
