"""The run report's one-line summary of the evaluate stage."""

from jobs.ops.run_report import _stage_line


def _modes(loss):
    return {"none": {"loss": loss + 1}, "memory": {"loss": loss}}


def test_one_chunk_sequences_report_the_qa_probe_not_zero_losses():
    # configs/facts.yaml: no held-out sequence is scored, eval.json's modes hold zeros
    r = {
        "sequences": 0,
        "modes": _modes(0.0),
        "qa": [
            {
                "file": "data/facts/probe.jsonl",
                "modes": {
                    "equal-compute control": {"loss": 3.1, "exact_match": 0.039},
                    "memory": {"loss": 0.95, "exact_match": 0.76},
                },
            }
        ],
    }
    line = _stage_line("evaluate", r)
    assert "held-out" not in line and "0.0000" not in line
    assert line == "QA probe probe.jsonl exact match equal-compute control 3.9%, memory 76.0%"


def test_held_out_losses_come_first_when_there_are_sequences():
    r = {"sequences": 31, "modes": _modes(4.5), "qa": []}
    assert _stage_line("evaluate", r) == "held-out loss none 5.5000, memory 4.5000"
