"""The operations subcommands of `m3`: rebuild, submit, jobs, logs, stop, schedule.

Kept out of jobs/cli/main.py so the CLI's core stays the stages; cli.py adds these parsers and
commands with one call each.
"""

from __future__ import annotations

import argparse
import json
import os

from jobs.cli import import_model
from jobs.cli.args import config_flag


def cmd_rebuild(cfg, args) -> int:
    from jobs.ops.rebuild import run_rebuild

    summary = run_rebuild(cfg, allow_shrink=args.allow_shrink)
    path = os.environ.get("M3_RUN_SUMMARY")  # set by `m3 schedule`: the run's counts and versions
    if path:
        from storage.staging import write_text_atomic

        write_text_atomic(path, json.dumps(summary, default=str))
    return 0


def cmd_submit(cfg, args) -> int:
    import shlex

    from jobs.ops.submit import submit, wait

    extra = shlex.split(args.stage_args)
    sid, what = submit(cfg, args.stage, extra, args.address, deadline_s=args.timeout)
    if what == "succeeded":
        print(
            f"m3 submit: {args.stage} with these inputs and this config already succeeded as job {sid}; nothing to do"
        )
        return 0
    if what == "running":
        print(f"m3 submit: {args.stage} with these inputs and this config is already running as job {sid}")
    else:
        print(f"m3 submit: submitted {args.stage} as job {sid} (follow it: m3 logs {sid} --follow)")
    if args.wait:
        status = wait(args.address, sid, follow=True, deadline_s=args.timeout)
        print(f"m3 submit: job {sid} {status}")
        return 0 if status == "SUCCEEDED" else 1
    return 0


def cmd_jobs(cfg, args) -> int:
    from jobs.ops.submit import list_jobs
    from storage.sql import render

    rows = list_jobs(args.address, args.timeout)
    columns = ["submission_id", "status", "stage", "start", "end", "message"]
    print(render(columns, [tuple(r[c] for c in columns) for r in rows], args.format))
    return 0


def cmd_logs(cfg, args) -> int:
    from jobs.ops.submit import logs

    logs(args.address, args.id, args.follow, args.timeout)
    return 0


def cmd_stop(cfg, args) -> int:
    from jobs.ops.submit import stop

    stopped = stop(args.address, args.id, args.timeout)
    print(f"m3 stop: {'stop requested for' if stopped else 'nothing to stop:'} job {args.id}")
    return 0


def cmd_schedule(cfg, args) -> int:
    from jobs.ops.schedule import run_schedule

    return run_schedule(cfg, max_runs=args.max_runs)  # its --address is schedule.address


# `m3 rebuild --allow-shrink` and `m3 run --allow-shrink` (jobs/ops/publish.py)
ALLOW_SHRINK = (
    "publish even if the new build has far fewer references than the live one (below "
    "1 - rebuild.max_shrink of them); a build with 0 references is never published"
)


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    timeout = argparse.ArgumentParser(add_help=False)
    timeout.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="how long to retry what the cluster reports as transient (no job agent yet, "
        "5xx, dropped connection); default $M3_SUBMIT_TIMEOUT_S or 60",
    )
    address = argparse.ArgumentParser(add_help=False, parents=[timeout])
    address.add_argument(
        "--address",
        default=None,
        help="Ray Jobs API (dashboard) address, default $RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265",
    )
    rebuild = sub.add_parser(
        "rebuild", parents=[common], help="incremental rebuild of the bank, published as `live` when it fully succeeds"
    )
    rebuild.add_argument("--allow-shrink", action="store_true", help=ALLOW_SHRINK)
    submit = sub.add_parser("submit", parents=[common, address], help="run a stage as a Ray job (Jobs API)")
    submit.add_argument("stage")
    submit.add_argument("--wait", action="store_true", help="stream the job's logs until it ends")
    submit.add_argument(
        "--stage-args",
        default="",
        metavar="ARGS",
        help="the stage's own arguments, quoted: m3 submit train -c F --stage-args '--stage warmup'",
    )
    jobs = sub.add_parser("jobs", parents=[common, address], help="list the cluster's Ray jobs")
    jobs.add_argument("--format", choices=("table", "csv", "json"), default="table")
    logs = sub.add_parser("logs", parents=[common, address], help="a Ray job's logs")
    logs.add_argument("id")
    logs.add_argument("--follow", "-f", action="store_true")
    stop = sub.add_parser("stop", parents=[common, address], help="stop a Ray job")
    stop.add_argument("id")
    schedule = sub.add_parser(
        "schedule", parents=[common, timeout], help="run rebuilds on the config's schedule.cron until SIGTERM"
    )
    config_flag(schedule, "--address", "schedule.address", "Ray Jobs API address: each run a Ray job", metavar="URL")
    schedule.add_argument("--max-runs", type=int, default=None, help="stop after this many runs (tests, one-offs)")
    import_model.add_parsers(sub, common)  # import-model, export-model


COMMANDS = {
    "rebuild": cmd_rebuild,
    "submit": cmd_submit,
    "jobs": cmd_jobs,
    "logs": cmd_logs,
    "stop": cmd_stop,
    "schedule": cmd_schedule,
    **import_model.COMMANDS,
}
