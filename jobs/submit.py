"""`m3 submit / jobs / logs / stop`: stages as Ray jobs through the Jobs API.

    m3 submit ingest -c configs/demo.yaml --address http://127.0.0.1:8265 [--wait]
    m3 jobs | m3 logs ID [--follow] | m3 stop ID

The job runs `python -m jobs.submit STAGE` on the cluster with this project as its working
directory (uploaded by Ray, .gitignore'd paths left out) and the resolved config in an
environment variable: what runs is what `m3 validate` printed here, whatever files the cluster
has. Relative bank and input paths are made absolute (or left relative to the project, which is
the job's working directory), so they mean the same thing there as here.

The submission id is a hash of the stage, the resolved config and the versions of the stage's
inputs (corpus files; input tables): submitting again what already succeeded is a no-op that
says so, what is running is not started twice, and a failed or stopped job is resubmitted under
the next free id (`...-r1`, `-r2`).

Ray 2.60 turns token auth on by default: a head started on a machine with a token (~/.ray/
auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) only answers clients that send it, and the
client sends it only in token mode. We switch it on whenever a token is there, as `ray start`
does, so no manual step is needed; a cluster without auth ignores the header.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

from jobs.config import Config, config_hash

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
CONFIG_ENV = "M3_SUBMIT_CONFIG"
STAGES = ("ingest", "encode", "embed", "pair", "train", "rebuild", "run", "generate", "eval")
# the tables each stage reads: their versions are part of the submission id
INPUT_TABLES = {"encode": ["refs"], "embed": ["refs"], "pair": ["train_sequences", "refs", "embeddings"],
                "train": ["train_sequences", "neighbors", "memories", "refs"],
                "generate": ["memories", "embeddings", "refs"], "eval": ["memories", "embeddings", "refs", "train_sequences"]}
READS_CORPUS = ("ingest", "rebuild", "run")
DONE = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(RuntimeError):
    pass


def client(address: str | None):
    """A Jobs API client, with the auth token sent when this machine has one."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    from ray.job_submission import JobSubmissionClient

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as e:
        raise SubmitError(f"no Ray Jobs API at {address} ({str(e).splitlines()[0]}): start a cluster "
                          f"(`ray start --head` or `ray up ray_cluster.yaml`) or pass --address") from None


def _portable(path: str | None) -> str | None:
    """A local path that means the same on the cluster: inside the project -> relative to it
    (the job's working directory), elsewhere -> absolute. URIs are left alone."""
    if path is None or "://" in path:
        return path
    p = Path(path).expanduser().resolve()
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def portable_config(cfg: Config, job: bool = False) -> dict:
    """The resolved config as it should read elsewhere; `job`: for a Ray job's driver, which must
    join the cluster it runs on instead of starting an embedded one."""
    d = cfg.as_dict()
    if job and not d["ray"]["address"]:
        d["ray"]["address"] = "auto"
    d["bank"]["uri"] = str(Path(d["bank"]["uri"]).expanduser().resolve()) if "://" not in d["bank"]["uri"] else d["bank"]["uri"]
    d["corpus"]["paths"] = [_portable(p) if not any(c in p for c in "*?[") else p for p in d["corpus"]["paths"]]
    d["encode"]["checkpoint"] = _portable(d["encode"]["checkpoint"])
    d["tokenizer"]["path"] = _portable(d["tokenizer"]["path"])
    return d


def _inputs(cfg: Config, stage: str) -> dict:
    """What the stage's result depends on besides the config: corpus file stats, input table
    versions, the checkpoint's files."""
    out: dict = {}
    if stage in READS_CORPUS:
        from pipelines.readers import expand_paths

        out["corpus"] = [[f.path, os.stat(f.path).st_size, os.stat(f.path).st_mtime_ns]
                         for f in expand_paths(cfg.corpus.paths, cfg.corpus.format)]
    if cfg.encode.checkpoint and stage in ("encode", "rebuild", "run", "train"):
        ck = Path(cfg.encode.checkpoint) / "model.safetensors"
        out["checkpoint"] = [ck.stat().st_size, ck.stat().st_mtime_ns] if ck.exists() else None
    if stage in INPUT_TABLES and "://" not in cfg.bank.uri and Path(cfg.bank.uri).exists():
        import lance

        for name in INPUT_TABLES[stage]:
            path = Path(cfg.bank.uri) / f"{name}.lance"
            out[name] = lance.dataset(str(path)).version if path.exists() else None
    return out


def submission_id(cfg: Config, stage: str, args: list[str]) -> str:
    return f"m3-{stage}-" + config_hash({"stage": stage, "args": args, "config": portable_config(cfg),
                                         "inputs": _inputs(cfg, stage)})


def submit(cfg: Config, stage: str, args: list[str], address: str | None = None, env: dict | None = None) -> tuple[str, str]:
    """Submit (or find) the job; returns (submission id, what happened: submitted | succeeded |
    running)."""
    if stage not in STAGES:
        raise SubmitError(f"unknown stage {stage!r}: expected one of {', '.join(STAGES)}")
    c = client(address)
    base = submission_id(cfg, stage, args)
    mine = [j for j in c.list_jobs() if (j.submission_id or "").startswith(base)]
    for j in mine:
        if _status(j) == "SUCCEEDED":
            return j.submission_id, "succeeded"
    for j in mine:
        if _status(j) not in DONE:
            return j.submission_id, "running"
    sid = base if not mine else f"{base}-r{len(mine)}"
    runtime_env = {"working_dir": str(ROOT), "excludes": [".git", ".venv", "bank", "runs"],
                   "env_vars": {CONFIG_ENV: yaml.safe_dump(portable_config(cfg, job=True), sort_keys=False),
                                "M3_PROGRESS": "0", **(env or {})}}
    c.submit_job(entrypoint=" ".join(["python", "-m", "jobs.submit", stage, *args]), submission_id=sid,
                 runtime_env=runtime_env, metadata={"m3_stage": stage, "m3_config": str(cfg.source)})
    return sid, "submitted"


def _status(job) -> str:
    return getattr(job.status, "value", str(job.status))


def wait(address: str | None, sid: str, follow: bool = True, poll_s: float = 1.0) -> str:
    """Stream the job's logs (or just poll) until it ends; returns its final status."""
    c = client(address)
    if follow:
        import asyncio

        async def tail():
            async for lines in c.tail_job_logs(sid):
                print(lines, end="", flush=True)

        asyncio.run(tail())
    while (status := _status(c.get_job_info(sid))) not in DONE:
        time.sleep(poll_s)
    return status


def list_jobs(address: str | None) -> list[dict]:
    rows = []
    for j in sorted(client(address).list_jobs(), key=lambda j: j.start_time or 0):
        rows.append({"submission_id": j.submission_id, "status": _status(j),
                     "stage": (j.metadata or {}).get("m3_stage", "-"),
                     "start": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((j.start_time or 0) / 1000)),
                     "end": time.strftime("%H:%M:%S", time.localtime(j.end_time / 1000)) if j.end_time else "-",
                     "message": (j.message or "").splitlines()[0][:60] if j.message else ""})
    return rows


def logs(address: str | None, sid: str, follow: bool) -> None:
    c = client(address)
    try:
        c.get_job_info(sid)
    except RuntimeError:
        raise SubmitError(f"no job {sid!r} at this cluster (see `m3 jobs`)") from None
    if follow:
        wait(address, sid, follow=True)
    else:
        print(c.get_job_logs(sid), end="")


def stop(address: str | None, sid: str) -> bool:
    c = client(address)
    try:
        return c.stop_job(sid)
    except RuntimeError as e:
        raise SubmitError(f"cannot stop {sid!r}: {str(e).splitlines()[0]}") from None


def main(argv: list[str]) -> int:
    """The job's entrypoint on the cluster: the stage, with the config the submitter resolved."""
    from jobs.cli import main as cli_main

    text = os.environ.get(CONFIG_ENV)
    if not text:
        print(f"jobs.submit: {CONFIG_ENV} is not set: this module is the entrypoint of `m3 submit` jobs",
              file=sys.stderr)
        return 2
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        return cli_main([argv[0], "-c", f.name, *argv[1:]])
    finally:
        os.unlink(f.name)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

