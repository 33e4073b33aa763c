"""Rebuild a dictionary corpus (data/foldoc, data/jargon) from Debian's dictd packages.

    apt-get download dict-foldoc dict-jargon && for f in dict-*.deb; do dpkg-deb -x $f x; done
    python scripts/dictd_to_jsonl.py x/usr/share/dictd/foldoc.dict.dz data/foldoc/foldoc.jsonl.gz foldoc
    python scripts/dictd_to_jsonl.py x/usr/share/dictd/jargon.dict.dz data/jargon/jargon.jsonl.gz jargon

A dictd database is gzip-compatible; an entry starts with one or more unindented headword lines and its
definition is the indented lines that follow. The first few entries are the database's own
header (00-database-*) and are skipped. The output keeps the text as FOLDOC wrote it: cleaning
is the pipeline's job, not this script's. Record ids are `<prefix>:<entry number>`.
"""

import gzip
import json
import sys


def entries(lines):
    """Yield (headwords, body lines). Consecutive unindented lines are aliases of one entry."""
    heads, body = [], []
    for line in lines:
        if line and not line[0].isspace():
            if body:
                yield heads, body
                heads, body = [], []
            heads.append(line.strip())
        elif heads:
            body.append(line.rstrip())
    if heads:
        yield heads, body


def main(src: str, dst: str, prefix: str = "foldoc") -> None:
    with gzip.open(src, "rt", encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    n = 0
    with gzip.open(dst, "wt", encoding="utf-8", compresslevel=9) as out:
        for heads, body in entries(lines):
            if heads[0].startswith("00-database"):
                continue
            text = "\n".join(line.strip() for line in body).strip()
            record = {"id": f"{prefix}:{n}", "title": heads[0], "text": f"{heads[0]}\n\n{text}"}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    print(f"{n} entries -> {dst}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
