"""`m3 run`: the whole pipeline in order, then one report of the run.

    m3 run -c configs/demo.yaml                      # every stage
    m3 run -c configs/demo.yaml --from pair          # from a stage on (the earlier ones are done)
    m3 run -c configs/demo.yaml --only warmup,embed

ingest -> warmup -> embed -> pair -> continual -> control -> encode -> publish -> evaluate. Every stage is resumable
and keyed by its inputs, so rerunning a finished run redoes nothing and a killed one continues
where it stopped. There is no encode between warmup and pair: the continual stage encodes its
references in real time with its current weights, so a bank encoded by the warmup model would
never be read; the one encode that matters comes after continual training, with the weights that
will read it (jobs/stages/encode.py picks the newest trained model). `control` trains the
equal-compute control (the continual stage's steps from the same warmup, without memory), the
baseline of the evaluation's headline; `train.control: false` skips it.

The whole run holds the bank's write lock (jobs/ops/lock.py; the stages take it too, reentrant):
no other writer, `m3 ingest` or a rebuild, runs beside it. `publish` goes through the rebuild's
publish policy (jobs/ops/publish.py): it publishes the versions this run's stages wrote or found
up to date (and, for a stage not run, the version there when the run started), compare-and-swap
against the live manifest read when the run started, refuses a build of 0 references or one
far smaller than the live build unless --allow-shrink, then applies retention (rebuild.keep_builds).

The report (<bank>/_reports/run.md, and run.json) gathers what each stage committed: the ingest
counts, the training curves, the held-out losses with and without memory, the evaluation in
the three inference modes and a sample generation with the memories it read.
"""

from __future__ import annotations

import time
from typing import Callable

from jobs.config import Config, ConfigError


def _ingest(cfg):
    from jobs.stages.ingest import run_ingest

    return run_ingest(cfg)


def _train(stage: str) -> Callable:
    def run(cfg):
        from jobs.training.trainer import run_train

        return run_train(cfg, stage)

    return run


def _control(cfg):
    """The equal-compute control, unless train.control is false."""
    if not cfg.train.control:
        print("control: skipped (train.control: false)", flush=True)
        return {"status": "skipped", "reason": "train.control: false"}
    return _train("control")(cfg)


def _embed(cfg):
    from jobs.stages.embed import run_embed

    return run_embed(cfg)


def _pair(cfg):
    from jobs.stages.pair import run_pair

    return run_pair(cfg)


def _encode(cfg):
    from jobs.stages.encode import run_encode

    return run_encode(cfg)


def _publish(cfg, bank, results: dict[str, dict], found: dict[str, int], token, allow_shrink: bool = False) -> dict:
    """Publish the build this run made as the bank's `live` one, through the rebuild's policy
    (jobs/ops/publish.py): inference and `m3 sql` read `live`. Refused when the tables come
    from different ingests (a partial run)."""
    from jobs.ops.publish import built_from, publish_build, stage_versions

    versions = stage_versions(results, found)
    out = publish_build(
        bank,
        cfg,
        versions,
        token,
        {"by": "m3 run"},
        allow_shrink=allow_shrink,
        what="run",
        built_from=built_from(results),
    )
    print(f"publish: build {versions} is live", flush=True)
    return {"versions": versions, "retention": out["retention"], "references": out["references"]}


# the run report's sample when the bank has no probe term: a FOLDOC-style opening
SAMPLE_PROMPT = "A compiler is a program that translates"


def probe_term(results: dict) -> str | None:
    """The knowledge-probe term whose definition memory helped most (its entry is in the bank,
    in no training sequence): the prompt of the report's side-by-side generation."""
    probe = results.get("probe") or {}
    modes = probe.get("modes") or {}
    none, mem = modes.get("none"), modes.get("memory, bank holds the entry")
    if not probe.get("prompts") or not none or not mem:
        return None
    gains = [
        (a - b if a is not None and b is not None else -1e9, i)
        for i, (a, b) in enumerate(zip(none["per_item"], mem["per_item"]))
    ]
    return probe["prompts"][max(gains)[1]]


def qa_prompt(cfg) -> str | None:
    """The first item of the config's first QA probe file: the sample of a bank whose knowledge
    is asked about in questions (a facts bank has no unseen entries for probe_term)."""
    from jobs.inference.qa_probes import read_probes

    files = cfg.infer.eval.probes or []
    return read_probes(files[0])[0].prompt if files else None


def _evaluate(cfg):
    """Held-out loss in every mode and the knowledge probe (jobs/inference/evaluate.py), then one prompt
    generated with memory and without, side by side, showing which memories each chunk read;
    one model load for all."""
    from jobs.inference.engine import Inference
    from jobs.inference.evaluate import render, run_eval
    from jobs.inference.generate import sample_generation, show_reads

    inf = Inference(cfg)
    results = run_eval(cfg, inference=inf)
    qa = qa_prompt(cfg)
    prompt = probe_term(results) or qa or SAMPLE_PROMPT
    sample = sample_generation(cfg, prompt, max_new_tokens=64, inference=inf)
    plain = sample_generation(cfg, prompt, max_new_tokens=64, mode="none", inference=inf)
    shown = show_reads(sample)
    print(
        f"sample generation (greedy) of {prompt!r}\n-- with memory:\n{sample['text']}\n{shown}\n"
        f"-- without memory:\n{plain['text']}",
        flush=True,
    )
    md = ["## Does memory help? The served bank (`m3 eval`)", "", "```", render(results), "```"]
    if results.get("plot"):
        md += ["", f"![evaluation]({results['plot']})"]
    md += [
        "",
        "## Sample generation, with and without memory",
        "",
        f"Prompt: `{prompt!r}` (greedy, same weights). "
        + (
            "The knowledge-probe term whose definition memory helped most (chosen, not typical): its "
            "entry is in the bank and in no training sequence."
            if prompt not in (SAMPLE_PROMPT, qa)
            else "The first item of the QA probe (infer.eval.probes), not chosen by its result."
            if prompt == qa
            else ""
        ),
        "",
        "| with memory | without memory |",
        "|---|---|",
        f"| {_cell(sample['text'])} | {_cell(plain['text'])} |",
        "",
        "Memories read (with memory):",
        "",
        "```",
        shown,
        "```",
    ]
    return {**results, "sample": sample, "sample_none": plain, "markdown": "\n".join(md)}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ").strip() or "(empty)"


STAGES: list[tuple[str, Callable]] = [
    ("ingest", _ingest),
    ("warmup", _train("warmup")),
    ("embed", _embed),
    ("pair", _pair),
    ("continual", _train("continual")),
    ("control", _control),
    ("encode", _encode),
    ("publish", _publish),
    ("evaluate", _evaluate),
]


def select(start: str | None = None, only: str | None = None) -> list[tuple[str, Callable]]:
    names = [n for n, _ in STAGES]
    if only:
        wanted = [s.strip() for s in only.split(",") if s.strip()]
        bad = [s for s in wanted if s not in names]
        if bad:
            raise ConfigError(f"--only: unknown stage(s) {', '.join(bad)}; stages are {', '.join(names)}")
        return [(n, f) for n, f in STAGES if n in wanted]
    if start:
        if start not in names:
            raise ConfigError(f"--from: unknown stage {start!r}; stages are {', '.join(names)}")
        return STAGES[names.index(start) :]
    return list(STAGES)


# stages that start Ray with its dashboard (training's State API; the shard runner's actors)
_DASHBOARD_STAGES = {"warmup", "embed", "pair", "continual", "control", "encode"}


def starts_ray_first(names: list[str]) -> bool:
    """Whether `m3 run` starts Ray (with its dashboard) before its first stage: ingest alone
    starts it without the dashboard, and a later stage in the same process would then restart
    the cluster to get it (one more Ray stop and start, seconds on 2 cores)."""
    return "ingest" in names and bool(set(names) & _DASHBOARD_STAGES)


def run_all(cfg: Config, start: str | None = None, only: str | None = None, allow_shrink: bool = False) -> dict:
    from jobs.ops.lock import write_lock
    from jobs.ops.publish import found_versions
    from storage.bank import Bank
    from storage.live import manifest_state

    stages = select(start, only)
    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    t_run = time.perf_counter()
    with write_lock(cfg, "m3 run"):  # the whole run: no other writer between two of its stages
        bank = Bank.of(cfg)
        _, token = manifest_state(bank)  # what `publish` publishes over (compare-and-swap)
        found = found_versions(bank)
        if starts_ray_first([n for n, _ in stages]):
            from jobs.runtime import init_ray

            init_ray(cfg.ray)
        for name, fn in stages:
            print(f"== m3 run: {name}", flush=True)
            t0 = time.perf_counter()
            if name == "publish":
                results[name] = _publish(cfg, bank, results, found, token, allow_shrink)
            else:
                results[name] = fn(cfg) or {}
            seconds[name] = round(time.perf_counter() - t0, 1)
        total = round(time.perf_counter() - t_run, 1)
        from jobs.ops.run_report import write_run_report

        path = write_run_report(cfg, bank, results, seconds, total)
    print(f"== m3 run: done in {total:.0f} s; report {path}", flush=True)
    return {"stages": results, "seconds": seconds, "total_seconds": total, "report": str(path)}
