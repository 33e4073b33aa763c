"""The per-step training log (<bank>/training/<stage>/log.jsonl): writing it so a resumed
run does not repeat steps, reading it (also while rank 0 is still appending), printing its
progress from the driver, and plotting it."""

from __future__ import annotations

import json
from pathlib import Path

from jobs.config.train import TrainConfig


def read_rows(path: Path) -> list[dict]:
    """The complete lines of a log; a line being written (no closing brace yet) is skipped."""
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    except FileNotFoundError:
        return []


def open_log(path: Path, start: int):
    """Keep the lines up to the resumed step: the ones after it are redone (and would repeat)."""
    kept = []
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start]
    f = path.open("w")
    f.writelines(line + "\n" for line in kept)
    return f


class LogFollower:
    """Prints rank 0's log lines from the driver: a worker's own prints reach the driver through
    Ray's log forwarding, which repeats some of them, and not at all under `ray job submit`
    until the job flushes."""

    def __init__(self, path: Path, stage: str, tc: TrainConfig):
        import threading

        self.path, self.stage, self.tc = path, stage, tc
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.seen = max((r["step"] for r in read_rows(self.path)), default=0)  # a resumed run's past

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)
        self._poll()

    def _run(self) -> None:
        while not self.done.wait(1.0):
            self._poll()

    def _poll(self) -> None:
        total = self.tc.stage_steps(self.stage)
        for row in read_rows(self.path):
            step = row["step"]
            if step > self.seen and (step % self.tc.log_every == 0 or step == total):
                print(progress_line(self.stage, row, total), flush=True)
                self.seen = step


def progress_line(stage: str, row: dict, total: int) -> str:
    hits = f" memory hits {row['memory_hits']}/{row['chunks']}" if stage == "continual" else ""
    return (
        f"train {stage} [{row['step']}/{total}] loss {row['loss']:.4f} lr {row['lr']:.2e} "
        f"{row['tokens_per_s']:,.0f} tok/s{hits}"
    )


# A stage drawn beside another instead of after it: the equal-compute control trains the
# continual stage's steps from the same warmup model, so its curve starts where continual's does.
BESIDE = {"control": "continual"}
LABELS = {"control": "control (continual's steps, no memory)"}


def curve_starts(logs: dict[str, list[dict]]) -> dict[str, int]:
    """The step each stage's curve starts after: the stages one after another, in order, and a
    stage of BESIDE where the stage it is beside starts."""
    offset, starts = 0, {}
    for stage, rows in logs.items():
        if stage not in BESIDE:
            starts[stage] = offset
            offset += rows[-1]["step"] if rows else 0
    return {stage: starts.get(BESIDE.get(stage, stage), offset) for stage in logs}


def plot_losses(logs: dict[str, list[dict]], path: Path) -> Path | None:
    """PNG of the stages' loss curves, each drawn after the one before (the control beside the
    continual stage, dashed), if matplotlib exists."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    starts = curve_starts(logs)
    for stage, rows in logs.items():
        if rows:
            ax.plot(
                [starts[stage] + r["step"] for r in rows],
                [r["loss"] for r in rows],
                label=LABELS.get(stage, stage),
                linestyle="--" if stage in BESIDE else "-",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
