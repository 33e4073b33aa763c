"""`m3 submit / jobs / logs / stop`: stages as Ray jobs through the Jobs API.

    m3 submit ingest -c configs/demo.yaml --address http://127.0.0.1:8265 [--wait]
    m3 jobs | m3 logs ID [--follow] | m3 stop ID

The job runs `python -m jobs.cli.entry STAGE` on the cluster with this project's checkout as its
working directory (jobs/project.py finds it; uploaded by Ray, .gitignore'd paths, .git, .venv and
a bank or training directory inside the project left out: `runtime_env`) and the resolved config
in an environment variable: what runs is what `m3 validate` printed here, whatever files the
cluster has. Relative bank and input paths are made absolute (or left relative to the project,
which is the job's working directory), so they mean the same thing there as here. Its `python` is
this machine's interpreter where the head has it at the same path (docs/cluster.md, "On a cluster": the
project and its .venv at the same path on every machine, and a head started as `.venv/bin/ray
start` has no .venv on its PATH), else the `python` on the head's PATH (ray_cluster*.yaml put the
cluster's .venv first): `entrypoint`.

The submission id is a hash of the stage, the resolved config and the versions of the stage's
inputs (corpus files; input tables): submitting again what already succeeded is a no-op that
says so, what is running is not started twice, and a failed or stopped job is resubmitted under
the next free id (`...-r1`, `-r2`).

Every call to the Jobs API rides out a cluster that is still starting or briefly overloaded: what
the API reports as transient (no job agent yet, a 5xx, a refused or reset connection) is retried
with backoff up to a deadline (`--timeout`, default $M3_SUBMIT_TIMEOUT_S or 60 s), then fails
with one line that says what to do. A missing job is not transient: it is "no job".

Ray 2.60 turns token auth on by default: a head started on a machine with a token (~/.ray/
auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) only answers clients that send it, and the
client sends it only in token mode. We switch it on whenever a token is there, as `ray start`
does, so no manual step is needed; a cluster without auth ignores the header.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from pathlib import Path

import yaml

from jobs.config import Config, config_hash
from jobs.project import ROOT, project_root
from model.errors import M3Error
from model.files import WEIGHTS_FILE
from storage.bank import LATEST, Bank

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
CONFIG_ENV = "M3_SUBMIT_CONFIG"
STAGES = ("ingest", "encode", "embed", "pair", "train", "rebuild", "run", "generate", "eval")
# the tables each stage reads: their versions are part of the submission id
INPUT_TABLES = {
    "encode": ["refs"],
    "embed": ["refs"],
    "pair": ["train_sequences", "refs", "embeddings"],
    "train": ["train_sequences", "neighbors", "memories", "refs"],
    "generate": ["memories", "embeddings", "refs"],
    "eval": ["memories", "embeddings", "refs", "train_sequences"],
}
READS_CORPUS = ("ingest", "rebuild", "run")
DONE = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(M3Error, RuntimeError):
    pass


# What the Jobs API (or the way to it) says when trying again later can succeed: the head's job
# agent has not registered yet, the dashboard is restarting or overloaded, a connection dropped.
_TRANSIENT = (
    "no available agent",
    "please try again later",
    "status code 500",
    "status code 502",
    "status code 503",
    "status code 504",
    "connection aborted",
    "connection refused",
    "connection reset",
    "remote end closed",
    "remotedisconnected",
    "failed to connect",
    "max retries exceeded",
    "read timed out",
    "temporarily unavailable",
)


def timeout_s() -> float:
    return float(os.environ.get("M3_SUBMIT_TIMEOUT_S", "60"))


def transient(e: BaseException) -> bool:
    import requests

    if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(t in text for t in _TRANSIENT)


def retrying(what: str, fn, deadline_s: float | None = None, address: str = "", hint: str | None = None):
    """fn() until it succeeds or fails for a reason that is not transient; transient failures
    are retried with backoff (0.5 s doubling to 5 s) until the deadline, then one SubmitError
    that ends with `hint` (what to do)."""
    limit = timeout_s() if deadline_s is None else deadline_s
    deadline = time.monotonic() + limit
    delay = 0.5
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified right below
            if not transient(e):
                raise
            if time.monotonic() + delay > deadline:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise SubmitError(
                    f"{what} at {address}: still failing after {limit:.0f} s ({first}); "
                    f"{hint or 'check that the cluster is up (`ray status`)'}, or allow longer "
                    f"with --timeout"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def client(address: str | None, deadline_s: float | None = None):
    """A Jobs API client, with the auth token sent when this machine has one; a cluster still
    starting is waited for (see `retrying`)."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    from ray.job_submission import JobSubmissionClient

    # m3 switches token mode on deliberately (see above): Ray's notice that it did is noise here
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = notice.level
    notice.setLevel(logging.ERROR)
    try:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        notice.setLevel(level)
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS
    todo = "start a cluster (`ray start --head` or `ray up ray_cluster.yaml`) or pass --address"
    try:
        return retrying("no Ray Jobs API", lambda: JobSubmissionClient(address), deadline_s, address, todo)
    except SubmitError:
        raise
    except RuntimeError as e:
        raise SubmitError(f"no Ray Jobs API at {address} ({str(e).splitlines()[0]}): {todo}") from None


class Jobs:
    """The Jobs API calls m3 makes, each retried while the cluster answers "try again"."""

    def __init__(self, address: str | None, deadline_s: float | None = None):
        self.c = client(address, deadline_s)
        self.address, self.deadline_s = self.c.get_address(), deadline_s

    def __getattr__(self, name):
        method = getattr(self.c, name)

        def call(*args, **kwargs):
            return retrying(name, lambda: method(*args, **kwargs), self.deadline_s, self.address)

        return call


# Never uploaded with the project, whatever .gitignore says (Ray also leaves out what it ignores,
# unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1). Relative to the project root, gitignore syntax;
# without a trailing slash, so that Ray does not walk the directory's files to leave each out.
EXCLUDES = ["/.git", "/.venv", "/bank", "/runs", "__pycache__", "*.egg-info", "/.pytest_cache", "/.hypothesis"]


def excludes(cfg: Config) -> list[str]:
    """EXCLUDES, and the config's bank and training directories where they lie inside the project
    (the job reads and writes them where they are, by their absolute paths)."""
    out = list(EXCLUDES)
    for path in (cfg.bank.uri, cfg.train.run_dir):
        if ROOT is not None and path and "://" not in path:
            p = Path(path).expanduser().resolve()
            if p != ROOT and p.is_relative_to(ROOT):
                out.append("/" + p.relative_to(ROOT).as_posix())
    return out


def _shipped(cfg: Config):
    """rel -> whether the upload holds that path of the project (excludes and .gitignore), with
    the patterns read at the first call."""
    specs = []

    def shipped(rel: Path) -> bool:
        if not specs:
            from ray._private.thirdparty.pathspec import PathSpec  # the matcher Ray's upload uses

            gitignore = ROOT / ".gitignore"
            lines = excludes(cfg) + (gitignore.read_text().splitlines() if gitignore.is_file() else [])
            specs.append(PathSpec.from_lines("gitwildmatch", lines))
        return not any(specs[0].match_file(a.as_posix()) for a in (rel, *list(rel.parents)[:-1]))

    return shipped


def _portable(path: str | None, shipped) -> str | None:
    """A local path that means the same on the cluster: a file the job's working directory holds
    (the project, as uploaded) -> relative to it, anything else -> absolute. URIs are left alone."""
    if path is None or "://" in path:
        return path
    p = Path(path).expanduser().resolve()
    if ROOT is not None and p.is_relative_to(ROOT) and shipped(p.relative_to(ROOT)):
        return str(p.relative_to(ROOT))
    return str(p)


def portable_config(cfg: Config, job: bool = False) -> dict:
    """The resolved config as it should read elsewhere; `job`: for a Ray job's driver, which must
    join the cluster it runs on instead of starting an embedded one."""
    d = cfg.as_dict()
    shipped = _shipped(cfg) if ROOT is not None else None
    if job and not d["ray"]["address"]:
        d["ray"]["address"] = "auto"
    d["bank"]["uri"] = (
        str(Path(d["bank"]["uri"]).expanduser().resolve()) if "://" not in d["bank"]["uri"] else d["bank"]["uri"]
    )
    moved = {p: _portable(p, shipped) if not any(c in p for c in "*?[") else p for p in d["corpus"]["paths"]}
    d["corpus"]["paths"] = [moved[p] for p in d["corpus"]["paths"]]
    d["corpus"]["roles"] = {moved[p]: role for p, role in d["corpus"]["roles"].items()}  # keyed by the paths
    d["encode"]["checkpoint"] = _portable(d["encode"]["checkpoint"], shipped)
    d["tokenizer"]["path"] = _portable(d["tokenizer"]["path"], shipped)
    return d


def _inputs(cfg: Config, stage: str) -> dict:
    """What the stage's result depends on besides the config: corpus file stats, input table
    versions, the checkpoint's files."""
    out: dict = {}
    if stage in READS_CORPUS:
        from pipelines.readers import expand_paths

        out["corpus"] = [
            [f.path, os.stat(f.path).st_size, os.stat(f.path).st_mtime_ns]
            for f in expand_paths(cfg.corpus.paths, cfg.corpus.format)
        ]
    if cfg.encode.checkpoint and stage in ("encode", "rebuild", "run", "train"):
        ck = Path(cfg.encode.checkpoint) / WEIGHTS_FILE
        out["checkpoint"] = [ck.stat().st_size, ck.stat().st_mtime_ns] if ck.exists() else None
    if stage in INPUT_TABLES and "://" not in cfg.bank.uri and Path(cfg.bank.uri).exists():
        bank = Bank.of(cfg)
        for name in INPUT_TABLES[stage]:
            there = Path(bank.layout.table(name)).exists()
            out[name] = bank.dataset(name, LATEST, check=False).version if there else None
    return out


def submission_id(cfg: Config, stage: str, args: list[str]) -> str:
    return f"m3-{stage}-" + config_hash(
        {"stage": stage, "args": args, "config": portable_config(cfg), "inputs": _inputs(cfg, stage)}
    )


def submit(
    cfg: Config,
    stage: str,
    args: list[str],
    address: str | None = None,
    env: dict | None = None,
    deadline_s: float | None = None,
) -> tuple[str, str]:
    """Submit (or find) the job; returns (submission id, what happened: submitted | succeeded |
    running)."""
    if stage not in STAGES:
        raise SubmitError(f"unknown stage {stage!r}: expected one of {', '.join(STAGES)}")
    c = Jobs(address, deadline_s)
    base = submission_id(cfg, stage, args)
    mine = [j for j in c.list_jobs() if (j.submission_id or "").startswith(base)]
    for j in mine:
        if _status(j) == "SUCCEEDED":
            return j.submission_id, "succeeded"
    for j in mine:
        if _status(j) not in DONE:
            return j.submission_id, "running"
    sid = base if not mine else f"{base}-r{len(mine)}"
    try:
        c.submit_job(
            entrypoint=entrypoint(stage, args),
            submission_id=sid,
            runtime_env=runtime_env(cfg, env),
            metadata={"m3_stage": stage, "m3_config": str(cfg.source)},
        )
    except RuntimeError as e:
        # a retried submission whose first attempt went through before its answer was lost
        if "already exists" not in str(e):
            raise SubmitError(f"submitting {stage} failed: {str(e).splitlines()[0][:300]}") from None
    return sid, "submitted"


def runtime_env(cfg: Config, env: dict | None = None) -> dict:
    """The job's runtime env: the project's checkout as its working directory, less `excludes`,
    the resolved config and the environment it asks for."""
    return {
        "working_dir": str(project_root("m3 submit")),
        "excludes": excludes(cfg),
        "env_vars": {
            CONFIG_ENV: yaml.safe_dump(portable_config(cfg, job=True), sort_keys=False),
            "M3_PROGRESS": "0",
            **_faults(),
            **(env or {}),
        },
    }


def entrypoint(stage: str, args: list[str]) -> str:
    """`python -m jobs.cli.entry STAGE ARGS`, run by the head's shell with the Python that has the
    project's packages there: this interpreter where the head has its path, else `python`."""
    command = shlex.join(["-m", "jobs.cli.entry", stage, *args])
    return f'PY={shlex.quote(sys.executable)}; [ -x "$PY" ] || PY=python; exec "$PY" {command}'


def _faults() -> dict:
    """The fault injection this process was asked for (jobs/faults.py) goes to the job: how the
    node-death tests reach a stage that runs on the cluster."""
    from jobs.faults import FAULT_ENV

    return {k: os.environ[k] for k in FAULT_ENV if os.environ.get(k)}


def _status(job) -> str:
    return getattr(job.status, "value", str(job.status))


def wait(
    address: str | None, sid: str, follow: bool = True, poll_s: float = 1.0, deadline_s: float | None = None
) -> str:
    """Stream the job's logs (or just poll) until it ends; returns its final status."""
    c = Jobs(address, deadline_s)
    if follow:
        import asyncio

        async def tail():
            async for lines in c.tail_job_logs(sid):
                print(lines, end="", flush=True)

        try:
            asyncio.run(tail())
        except Exception as e:  # noqa: BLE001 - the stream broke: the status below still tells the end
            if not transient(e):
                raise
            print(
                f"\nm3: the log stream of {sid} broke ({str(e).splitlines()[0][:120]}); waiting for the job "
                f"to end (m3 logs {sid} shows the rest)",
                flush=True,
            )
    while (status := _status(c.get_job_info(sid))) not in DONE:
        time.sleep(poll_s)
    return status


def list_jobs(address: str | None, deadline_s: float | None = None) -> list[dict]:
    rows = []
    for j in sorted(Jobs(address, deadline_s).list_jobs(), key=lambda j: j.start_time or 0):
        rows.append(
            {
                "submission_id": j.submission_id,
                "status": _status(j),
                "stage": (j.metadata or {}).get("m3_stage", "-"),
                "start": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((j.start_time or 0) / 1000)),
                "end": time.strftime("%H:%M:%S", time.localtime(j.end_time / 1000)) if j.end_time else "-",
                "message": (j.message or "").splitlines()[0][:60] if j.message else "",
            }
        )
    return rows


def _job_info(c: Jobs, sid: str):
    try:
        return c.get_job_info(sid)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise SubmitError(f"no job {sid!r} at this cluster (see `m3 jobs`)") from None
        raise SubmitError(f"cannot read job {sid!r}: {str(e).splitlines()[0][:300]}") from None


def logs(address: str | None, sid: str, follow: bool, deadline_s: float | None = None) -> None:
    c = Jobs(address, deadline_s)
    _job_info(c, sid)
    if follow:
        wait(address, sid, follow=True, deadline_s=deadline_s)
    else:
        print(c.get_job_logs(sid), end="")


def stop(address: str | None, sid: str, deadline_s: float | None = None) -> bool:
    c = Jobs(address, deadline_s)
    _job_info(c, sid)
    try:
        return c.stop_job(sid)
    except RuntimeError as e:
        raise SubmitError(f"cannot stop {sid!r}: {str(e).splitlines()[0]}") from None
