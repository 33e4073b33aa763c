"""How often the pair stage gives a training chunk the description of an entity the chunk names
(the facts corpus, scripts/make_facts.py): the share of chunks whose rank-0 neighbour (what the
paper's schedule reads) comes from a bank record whose entity's name is in the chunk's text.

    python bench/facts_pairing.py /tmp/fbank data/facts/train.jsonl.gz

Names come from the training file's `entity` field and each FAQ's first line; the bank record's
id is the entity id (make_facts writes them so).
"""
import glob
import gzip
import json
import re
import sys
from pathlib import Path

import lance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's model/, not bench/model.py

from pipelines.tokenizer import load  # noqa: E402

bank, train = sys.argv[1], sys.argv[2]
docs = lance.dataset(f"{bank}/documents.lance").to_table(columns=["doc_id", "source_id"]).to_pylist()
source = {d["doc_id"]: d["source_id"] for d in docs}
names = {}
for line in gzip.open(train, "rt"):
    d = json.loads(line)
    if d["kind"] == "faq":
        head = d["text"].split("\n")[0]
        names[d["entity"]] = re.match(r"(?:Questions about |A short quiz on )?(.+?)(?:: questions and answers)?\.$", head).group(1)
tok = load(glob.glob(f"{bank}/tokenizers/*.json")[0])
seqs = {s["seq_id"]: s["token_ids"] for s in
        lance.dataset(f"{bank}/train_sequences.lance").to_table(columns=["seq_id", "token_ids"]).to_pylist()}
neighbors = lance.dataset(f"{bank}/neighbors.lance").to_table(filter="rank = 0").to_pylist()
hits = 0
for r in neighbors:
    text = tok.decode(seqs[r["seq_id"]][r["chunk"] * 64:(r["chunk"] + 1) * 64])
    entity = source.get(r["ref_id"].rsplit("-", 1)[0])
    hits += entity in names and names[entity] in text
print(f"{len(neighbors)} chunks; rank-0 reference names an entity of the chunk: {hits} ({hits / len(neighbors):.1%})")
