"""The run report's sample prompt: a bank asked about through QA probes shows the first probe
item (not the FOLDOC-style default, which a facts bank cannot answer)."""

import json

from jobs.config import Config, InferConfig
from jobs.config.infer import EvalConfig
from jobs.ops.run import SAMPLE_PROMPT, qa_prompt


def test_the_sample_is_the_first_qa_item_when_there_are_probes(tmp_path):
    path = tmp_path / "probe.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "answer": " x"}) for p in ("Q: first?\nA:", "Q: second?\nA:")))
    cfg = Config(infer=InferConfig(eval=EvalConfig(probes=(str(path),))))
    assert qa_prompt(cfg) == "Q: first?\nA:"
    assert qa_prompt(Config()) is None and SAMPLE_PROMPT
