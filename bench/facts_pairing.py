"""How often the pair stage gives a training chunk the description of an entity the chunk names
(the facts corpus, scripts/make_facts.py): the share of chunks whose rank-0 neighbour (what the
paper's schedule reads) comes from a bank record whose entity's name is in the chunk's text.

    python bench/facts_pairing.py /tmp/fbank data/facts/train.jsonl.gz
    python bench/facts_pairing.py /tmp/bm25bank data/facts/train.jsonl.gz --time 300

Names come from the training file's `entity` field and each FAQ's first line; the bank record's
id is the entity id (make_facts writes them so). The retrieval method is the one the neighbors'
lineage names. --time N: one chunk-sized query at a time (what a swap point of `m3 generate`
asks), N chunks sampled with seed 0, through storage.lexical.retrieve by each method the bank's
embeddings can serve; median ms per query, embedding included (the bank is only read).
"""

import argparse
import glob
import gzip
import json
import random
import re
import sys
import time
from pathlib import Path

import lance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's model/, not bench/model.py

from pipelines.tokenizer import load  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("bank")
ap.add_argument("train")
ap.add_argument("--time", type=int, default=0, metavar="N", help="time N single queries per method")
args = ap.parse_args()
bank, train = args.bank, args.train
docs = lance.dataset(f"{bank}/documents.lance").to_table(columns=["doc_id", "source_id"]).to_pylist()
source = {d["doc_id"]: d["source_id"] for d in docs}
names = {}
for line in gzip.open(train, "rt"):
    d = json.loads(line)
    if d["kind"] == "faq":
        head = d["text"].split("\n")[0]
        names[d["entity"]] = re.match(
            r"(?:Questions about |A short quiz on )?(.+?)(?:: questions and answers)?\.$", head
        ).group(1)
tok = load(glob.glob(f"{bank}/tokenizers/*.json")[0])
seqs = {
    s["seq_id"]: s["token_ids"]
    for s in lance.dataset(f"{bank}/train_sequences.lance").to_table(columns=["seq_id", "token_ids"]).to_pylist()
}
ds = lance.dataset(f"{bank}/neighbors.lance")
method = json.loads(ds.schema.metadata[b"m3"]).get("method", "vector")
neighbors = ds.to_table(filter="rank = 0").to_pylist()
hits = 0
for r in neighbors:
    text = tok.decode(seqs[r["seq_id"]][r["chunk"] * 64 : (r["chunk"] + 1) * 64])
    entity = source.get(r["ref_id"].rsplit("-", 1)[0])
    hits += entity in names and names[entity] in text
print(
    f"{len(neighbors)} chunks (paired by {method}); rank-0 reference names an entity of the chunk: "
    f"{hits} ({hits / len(neighbors):.1%})"
)

if args.time:
    import numpy as np

    from pipelines.embedder import load_embedder
    from storage.bank import Bank
    from storage.lexical import fts_info, retrieve
    from storage.vectors import search, search_params

    table = Bank(bank).table("embeddings")
    emb_meta = json.loads(table.schema.metadata[b"m3"])
    embedder = load_embedder(emb_meta["config"]["retrieval"]["embedder"])
    params = search_params(table)
    rng = random.Random(0)
    picks = rng.sample(sorted(seqs), args.time)
    chunks = [
        tok.decode(seqs[s][c * 64 : (c + 1) * 64], skip_special_tokens=True)
        for s, c in ((s, rng.randrange(max(1, len(seqs[s]) // 64))) for s in picks)
    ]
    dense = lambda texts, k: search(table, embedder.embed(texts), k=k, params=params)  # noqa: E731
    for m in ("vector", "bm25", "hybrid") if fts_info(table) else ("vector",):
        retrieve(m, chunks[:1], 8, table=table, vector_hits=dense)  # warm
        ms = []
        for text in chunks:
            t0 = time.perf_counter()
            retrieve(m, [text], 8, table=table, vector_hits=dense)
            ms.append((time.perf_counter() - t0) * 1e3)
        print(
            f"{m}: median {np.median(ms):.1f} ms per single query (k=8, {len(chunks)} chunks), "
            f"p90 {np.percentile(ms, 90):.1f} ms"
        )
