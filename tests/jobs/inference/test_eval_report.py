"""eval_report.render on an evaluation whose held-out text has nothing to score (one-chunk
sequences, configs/facts.yaml): one line that says why, not a table of zero losses."""

from jobs.inference.eval_report import render

ZERO = {"loss": 0.0, "ppl": 1.0, "tokens": 0, "per_item": []}


def report(sequences: int) -> dict:
    return {
        "sequences": sequences,
        "tokens_per_sequence": 64,
        "model_hash": "ab" * 8,
        "sink": True,
        "max_overlap": 0.6667,
        "headline": {},
        "modes": {"none": dict(ZERO), "memory": dict(ZERO)},
        "probe": {"note": "every document of the bank is in a training sequence"},
        "qa": [],
    }


def test_one_chunk_sequences_say_why_held_out_text_is_not_scored():
    text = render(report(0))
    assert "nothing to score" in text and "QA probe" in text
    assert "0.0000" not in text and "too few sequences" not in text
    assert "knowledge probe: every document" in text  # the probes still report


def test_scored_held_out_text_keeps_its_table():
    assert "0.0000" in render(report(3)) and "nothing to score" not in render(report(3))
