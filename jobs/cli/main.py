"""The `m3` command. Every subcommand takes -c/--config FILE and any number of --set key=value.

m3 validate -c configs/demo.yaml
m3 ingest   -c configs/demo.yaml --set corpus.records_per_shard=500
m3 sql      -c configs/demo.yaml "SELECT reason, count(*) FROM rejects GROUP BY 1"
m3 run      -c configs/demo.yaml          # every stage that exists, in order
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

import yaml

from jobs.cli.args import config_parser
from jobs.cli.generate import add_parser as add_generate
from jobs.cli.generate import cmd_generate
from jobs.cli.ops import ALLOW_SHRINK
from jobs.cli.ops import COMMANDS as OPS_COMMANDS
from jobs.cli.ops import add_parsers as add_ops
from jobs.cli.serve import add_parser as add_serve
from jobs.cli.serve import cmd_serve
from jobs.cli.train import add_parser as add_train
from jobs.cli.train import cmd_train
from jobs.config import load_config
from model.errors import M3Error


def cmd_validate(cfg, args) -> int:
    # Input paths are part of validity: a missing file should fail here, not an hour in.
    from pipelines.readers import check_parquet_columns, expand_paths

    files = expand_paths(cfg.corpus.paths, cfg.corpus.format, cfg.corpus.roles)
    check_parquet_columns(files, cfg.corpus.text_key)
    _check_model_inputs(cfg)
    print(yaml.safe_dump(cfg.as_dict(), sort_keys=False).rstrip())
    print(f"# OK: {cfg.source} is valid; {len(files)} input file(s)")
    return 0


def _check_model_inputs(cfg) -> None:
    """The other files a config names, as the stages will open them: a pinned tokenizer
    (ingest) and a model to encode with (encode). Local paths only: an object store is not
    asked here."""
    from jobs.config import ConfigError
    from model.files import WEIGHTS_FILE
    from pipelines.tokenizer import TokenizerError, load

    def local(key: str, path: str | None):
        if not path or ("://" in path and not path.startswith("file://")):
            return None
        p = Path(path.removeprefix("file://"))
        if not p.exists():
            raise ConfigError(f"{key}: {path} does not exist (working directory {os.getcwd()})")
        return p

    if local("tokenizer.path", cfg.tokenizer.path):
        try:
            load(cfg.tokenizer.path)
        except TokenizerError as e:
            raise ConfigError(f"tokenizer.path: {e}") from None
    checkpoint = local("encode.checkpoint", cfg.encode.checkpoint)
    if checkpoint and not (checkpoint / WEIGHTS_FILE).is_file():
        raise ConfigError(f"encode.checkpoint: {cfg.encode.checkpoint} holds no {WEIGHTS_FILE}")


def cmd_search(cfg, args) -> int:
    from jobs.stages.embed import search_text
    from storage.bank import Bank
    from storage.builds import pinned_bank

    # --build: the tables (and their vector and full-text indexes) of that published build
    bank = pinned_bank(Bank.of(cfg), args.build) if args.build is not None else None
    for hit in search_text(cfg, args.text, k=args.k, exact=args.exact, bank=bank):
        text = hit["text"].replace("\n", " ")
        print(f"{hit['rank']}. [{hit['score']:.3f}] {hit['ref_id']}  {text[:160]}{'...' if len(text) > 160 else ''}")
    return 0


def cmd_bank(cfg, args) -> int:
    from storage.bank import Bank

    if args.action == "diff":
        from storage.diff import diff_builds, render

        if len(args.builds) != 2:
            raise M3Error("usage: m3 bank diff A B (build numbers, `live`, or offsets like -1)")
        out = diff_builds(Bank.of(cfg), *args.builds)
    elif args.builds:
        raise M3Error(f"`m3 bank {args.action}` takes no arguments (got {' '.join(args.builds)})")
    elif args.action == "compact":
        from jobs.ops.compact import render, run_compact

        out = run_compact(cfg)
    elif args.action == "verify":
        from jobs.ops.verify import failure, render, verify_bank

        out = verify_bank(Bank.of(cfg), args.build, args.quick)
        print(json.dumps(out, indent=2) if args.format == "json" else render(out))
        if (err := failure(out)) is not None:
            raise err  # one line, rc 2, after the table of checks
        return 0
    else:
        from jobs.ops.bank_stats import bank_stats, render

        out = bank_stats(Bank.of(cfg), cfg.rebuild.keep_builds)
    print(json.dumps(out, indent=2) if args.format == "json" else render(out))
    return 0


def cmd_sql(cfg, args) -> int:
    import os

    from storage.bank import Bank
    from storage.builds import reader_bank
    from storage.sql import render_stream, stream

    # default: the last published build, never a rebuild in progress (storage/live.py)
    bank = reader_bank(Bank.of(cfg), args.build, args.tag, args.versions)
    columns, batches = stream(bank, args.query)
    try:  # batch by batch as DuckDB produces them: any size of result in bounded memory (storage/sql.py)
        for text in render_stream(columns, batches, args.format):
            sys.stdout.write(text)
            sys.stdout.flush()
    except BrokenPipeError:  # `m3 sql ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        batches.close()
    return 0


def cmd_stage(cfg, args) -> int:
    """One stage by its name (ingest, encode, embed, pair): the same functions `m3 run` calls."""
    from jobs.ops.run import STAGES

    dict(STAGES)[args.command](cfg)
    return 0


def cmd_run(cfg, args) -> int:
    from jobs.ops.run import run_all

    run_all(cfg, start=args.start, only=args.only, allow_shrink=args.allow_shrink)
    return 0


def cmd_eval(cfg, args) -> int:
    from jobs.inference.evaluate import run_eval

    run_eval(cfg, build=args.build)
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = config_parser()
    parser = argparse.ArgumentParser(prog="m3", description="Memory3 data pipelines")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("validate", parents=[common], help="check a config and its inputs, print it resolved")
    sub.add_parser("ingest", parents=[common], help="raw corpus -> documents, rejects, refs, train_sequences")
    sub.add_parser("encode", parents=[common], help="refs -> sparse memories (the memories table)")
    sub.add_parser("embed", parents=[common], help="refs -> retrieval vectors (the embeddings table) + ANN index")
    sub.add_parser("pair", parents=[common], help="64-token training chunks -> their best reference (neighbors)")
    search = sub.add_parser("search", parents=[common], help="the references closest to a text")
    search.add_argument("text")
    search.add_argument("-k", type=int, default=5)
    search.add_argument("--exact", action="store_true", help="exact scan instead of the ANN index")
    search.add_argument(
        "--build", help="search a published build (its number, `live`, -1 = before live) instead of the latest tables"
    )
    add_train(sub, common)
    bank = sub.add_parser(
        "bank", parents=[common], help="`m3 bank stats`, `m3 bank diff A B`, `m3 bank compact`, `m3 bank verify`"
    )
    bank.add_argument("action", choices=("stats", "diff", "compact", "verify"))
    bank.add_argument("builds", nargs="*", metavar="BUILD", help="diff: two builds (numbers, `live`, -1 = before live)")
    bank.add_argument("--format", choices=("table", "json"), default="table")
    bank.add_argument(
        "--quick", action="store_true", help="verify: the cheap part only (files, row counts, manifest, slab header)"
    )
    bank.add_argument(
        "--build", help="verify: a published build (its number, `live`, -1 = before live) instead of the live one"
    )
    sql = sub.add_parser("sql", parents=[common], help="run read-only SQL (DuckDB) over the bank's tables")
    sql.add_argument("query")
    sql.add_argument("--format", choices=("table", "csv", "json"), default="table")
    sql.add_argument("--build", help="read a published build: its number, `live`, or -1 = the one before live")
    sql.add_argument("--tag", help="read each table at this Lance tag (tables without it: the live build)")
    sql.add_argument(
        "--version",
        dest="versions",
        action="append",
        default=[],
        metavar="TABLE=V",
        help="read TABLE at version V (repeatable; applied after --build/--tag)",
    )
    run = sub.add_parser("run", parents=[common], help="every stage in order, then the run report")
    run.add_argument("--from", dest="start", metavar="STAGE", help="start at this stage (the earlier ones are done)")
    run.add_argument("--only", metavar="STAGES", help="comma-separated stages to run, in pipeline order")
    run.add_argument("--allow-shrink", action="store_true", help=ALLOW_SHRINK)
    add_ops(sub, common)  # rebuild, submit, jobs, logs, stop, schedule
    add_generate(sub, common)
    add_serve(sub, common)
    ev = sub.add_parser("eval", parents=[common], help="held-out loss with memory, without, with RAG; knowledge probe")
    ev.add_argument(
        "--build",
        help="evaluate a published build (its number, `live`, -1 = the one before live) "
        "instead of the live one, with the model its memories were written by",
    )
    return parser


COMMANDS = {
    "validate": cmd_validate,
    "ingest": cmd_stage,
    "encode": cmd_stage,
    "embed": cmd_stage,
    "pair": cmd_stage,
    "search": cmd_search,
    "train": cmd_train,
    "bank": cmd_bank,
    "sql": cmd_sql,
    "run": cmd_run,
    "generate": cmd_generate,
    "serve": cmd_serve,
    "eval": cmd_eval,
    **OPS_COMMANDS,
}


def _raised(e: BaseException) -> BaseException:
    """The error a Ray task or actor raised, out of the RayTaskError that carries it to the
    driver (whose text is the task's whole traceback)."""
    exceptions = sys.modules.get("ray.exceptions")
    while exceptions is not None and isinstance(e, exceptions.RayTaskError) and isinstance(e.cause, BaseException):
        e = e.cause
    return e


def _user_error(e: BaseException, cfg) -> str | None:
    """The one line for an error the person running m3 can fix, None for a bug: an M3Error (the
    input, config, bank or cluster is wrong) or a full disk. A full disk is errno ENOSPC, or its
    text where a library passes the error on without the errno (Lance: "... (os error 28)")."""
    if isinstance(e, M3Error):
        return str(e)
    if getattr(e, "errno", None) == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(e):
        where = getattr(e, "filename", None) or (f"the bank at {cfg.bank.uri}" if cfg is not None else "the disk")
        return (
            f"no space left on device writing {where}: the bank's live build is intact (a build is "
            f"published only once it is whole); free space and rerun"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        return COMMANDS[args.command](cfg, args)
    except Exception as e:  # noqa: BLE001 - one line for what the user can fix; anything else is a bug: re-raised
        raised = _raised(e)
        message = _user_error(raised, cfg)
        if message is None:
            raise
        if raised is not e:
            # the stage's other tasks that failed too (the same bad input, often) would each be
            # logged by Ray with its traceback as their results are dropped: this line says it
            os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
        print(f"m3 {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
