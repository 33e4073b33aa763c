"""Build data/pydoc/pydoc.jsonl.gz from Debian's python3.11-doc package: Python's own prose
documentation (tutorial, language reference, HOWTOs, FAQ, glossary), one record per section.

    apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb x
    python scripts/pydoc_to_jsonl.py x/usr/share/doc/python3.11/html/_sources data/pydoc/pydoc.jsonl.gz

The reST sources are kept as written (markup included): cleaning is the pipeline's job. A
section starts at a title line underlined (and maybe overlined) with one punctuation character
repeated at least as long as the title; its record is the title and the text up to the next
section. Record ids are `pydoc:<file>#<section number>`. The library reference is left out on
purpose: at 6.8 MB of API listings it would dwarf the prose and the demo's compute budget.
"""

import gzip
import json
import re
import sys
from pathlib import Path

PARTS = ("tutorial", "reference", "howto", "faq", "glossary.rst.txt")
_UNDERLINE = re.compile(r"^([=\-~^*#+\"'`:.])\1{2,}\s*$")


def sections(text: str):
    """Yield (title, body) of each section of one reST file."""
    lines = text.split("\n")
    starts = []  # (title line index, first body line index)
    for i in range(1, len(lines)):
        title = lines[i - 1].strip()
        if (
            title
            and _UNDERLINE.match(lines[i])
            and len(lines[i].rstrip()) >= len(title)
            and not _UNDERLINE.match(lines[i - 1])
        ):
            starts.append((i - 1, i + 1))
    for n, (t, b) in enumerate(starts):
        end = starts[n + 1][0] if n + 1 < len(starts) else len(lines)
        if end > b and _UNDERLINE.match(lines[end - 1]):  # the next title's overline
            end -= 1
        body = "\n".join(lines[b:end]).strip()
        if body:
            yield lines[t].strip(), body


def main(src: str, dst: str) -> None:
    root = Path(src)
    files = sorted(
        p for part in PARTS for p in ([root / part] if part.endswith(".txt") else (root / part).rglob("*.rst.txt"))
    )
    n = 0
    with gzip.open(dst, "wt", encoding="utf-8", compresslevel=9) as out:
        for path in files:
            rel = str(path.relative_to(root)).removesuffix(".rst.txt")
            for k, (title, body) in enumerate(sections(path.read_text(encoding="utf-8"))):
                record = {"id": f"pydoc:{rel}#{k}", "title": title, "text": f"{title}\n\n{body}"}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                n += 1
    print(f"{n} sections of {len(files)} files -> {dst}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
