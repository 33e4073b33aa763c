"""`m3 bank verify`: is every table of a build there, readable, and what it says it is?

    m3 bank verify -c configs/demo.yaml              # the live build, every check
    m3 bank verify -c configs/demo.yaml --quick      # the cheap part (what `m3 rebuild` runs)
    m3 bank verify -c configs/demo.yaml --build 7    # a published build (storage/builds.py)

Which versions: the live manifest's (storage/live.py), or those of `--build N`; without `--build`,
tables the manifest does not name (neighbors, ...) are checked at their latest version, and a bank
never published has every table checked at its latest.

The cheap part (`--quick`; reads manifests, file footers and the slab's header, no table data):
- manifest   every version it names is on disk, and its lineage keys (ingest_key, encode_key)
             are those of the refs and memories versions it names;
- files      per table: every data and deletion file of the version is there, with the size its
             manifest recorded (storage/bank.py `damaged_files`), and each data file opens (its
             Lance footer) and holds the rows the manifest counts for it;
- slab       the memories version's payload slab (storage/slab.py): its header against the table
             (format, rows, codec, model, payload size) and its files' sizes, and the checksum
             file against the header's digest (none is fine: readers use Lance).

The rest reads every byte, in streamed batches (bounded memory), vectorized where it can be:
- scan       per table: every column of every row decodes, and as many rows come back as the
             manifest counts; refs: content_hash is `token_hash(token_ids)` (the function the chunk
             step computes it with, pipelines/chunk_step.py) and n_tokens = len(token_ids);
             documents: content_hash is `content_hash(text)` (pipelines/normalize.py) and n_chars =
             len(text); memories: every payload's crc32 is the one the slab was written with, and
             the (ref_id, content_hash) digest is the slab header's;
- slab payload  every row of the slab's payload file against its crc32, and the file against the
             header's payload_digest (storage/slab.py `verify_payloads`);
- embeddings ⊆ refs  every embedding's ref_id is a reference of the same build.

The result is a table of checks, ok or FAILED with a one-line reason each; `m3 bank verify` exits
with 0 when all pass, else with one line (VerifyError, rc 2) counting and naming the failures.
BENCHMARKS.md "Integrity on read" has its time on the demo bank.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model.errors import M3Error
from storage import slab as slabs
from storage.bank import Bank, _decode, damaged_files, unreadable
from storage.live import read_manifest


class VerifyError(M3Error, RuntimeError):
    """A bank that failed verification: the one-line summary of what failed."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float = 0.0


class _Run:
    def __init__(self):
        self.checks: list[Check] = []

    def add(self, name: str, fn) -> object:
        """Run fn() -> (ok, detail[, value]); an exception is a failed check with its one line."""
        t0 = time.perf_counter()
        value = None
        try:
            got = fn()
            ok, detail = got[0], got[1]
            value = got[2] if len(got) > 2 else None
        except M3Error as e:
            ok, detail = False, str(e)
        except Exception as e:  # noqa: BLE001 (Lance/Arrow reading a damaged file: a failed check, said in one line)
            ok, detail = False, _one_line(e)
        self.checks.append(Check(name, bool(ok), detail, round(time.perf_counter() - t0, 3)))
        return value


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first.split(', /')[0][:300]}"


def versions_of(bank: Bank, build: str | None) -> tuple[dict[str, int | None], str, dict | None]:
    """The table versions to check (None: the latest), what they are (for the report's title),
    and the manifest entry naming them (None before the first published build)."""
    if build is not None:
        from storage.builds import resolve_build

        entry = resolve_build(bank, build)
        return dict(entry["versions"]), f"build {entry['build']}", entry
    names = bank.tables()
    manifest = read_manifest(bank)
    if not manifest:
        return {n: None for n in names}, "latest versions (no published build)", None
    return {**{n: None for n in names}, **manifest["versions"]}, f"live build {manifest.get('build', '?')}", manifest


def verify_bank(bank: Bank, build: str | None = None, quick: bool = False) -> dict:
    t0 = time.perf_counter()
    versions, what, entry = versions_of(bank, build)
    run = _Run()
    datasets: dict[str, lance.LanceDataset] = {}

    def manifest():
        bad, opened = [], 0
        for name, v in versions.items():
            try:
                # unchecked: finding the damage is this command's own work, check by check
                datasets[name] = bank.dataset(name, version=v, check=False)
                opened += 1
            except Exception as e:  # noqa: BLE001
                bad.append(f"{name} version {v} cannot be opened ({_one_line(e)})")
        if entry:
            for key, table in (("ingest_key", "refs"), ("encode_key", "memories")):
                if entry.get(key) and table in datasets:
                    have = _decode(datasets[table].schema.metadata).get(key)
                    if have != entry[key]:
                        bad.append(
                            f"its {key} {entry[key]!r} is not that of {table} version "
                            f"{datasets[table].version} ({have!r})"
                        )
        if bad:
            return False, f"{what}: {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
        pinned = ", ".join(f"{n} v{datasets[n].version}" for n in versions if n in datasets)
        return True, f"{what}: {opened} table(s) open ({pinned})"

    run.add("manifest", manifest)
    for name in versions:
        if name in datasets:
            run.add(f"files {name} v{datasets[name].version}", lambda n=name: _files(bank, n, datasets[n]))
    mem = datasets.get("memories")
    header = None
    if mem is not None:
        header = run.add(f"slab memories v{mem.version}", lambda: _slab_header(bank, mem))
    if not quick:
        ref_ids = None
        for name in versions:
            if name not in datasets:
                continue
            ds = datasets[name]
            got = run.add(f"scan {name} v{ds.version}", lambda n=name, d=ds: _scan(bank, n, d, header))
            if name == "refs":
                ref_ids = got
        if header is not None:
            run.add(f"slab payload memories v{mem.version}", lambda: _slab_payloads(bank, mem.version))
        if "embeddings" in datasets and ref_ids is not None:  # refs unreadable: failed above
            run.add("embeddings ⊆ refs", lambda: _subset(datasets["embeddings"], ref_ids))
    failed = [c for c in run.checks if not c.ok]
    return {
        "uri": bank.uri,
        "what": what,
        "quick": quick,
        "checks": [asdict(c) for c in run.checks],
        "failed": len(failed),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _files(bank: Bank, name: str, ds) -> tuple[bool, str]:
    bad = damaged_files(bank, name, ds)
    if bad:
        return False, bad[0] + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
    from lance.file import LanceFileReader

    files = size = 0
    base = bank.layout.table(name)
    for frag in ds.get_fragments():
        md = frag.metadata
        for f in md.files:
            try:
                n = LanceFileReader(f"{base}/data/{f.path}").metadata().num_rows
            except Exception as e:  # noqa: BLE001
                return False, f"its file {name}.lance/data/{f.path} does not open ({_one_line(e)})"
            if n != md.physical_rows:
                return False, (
                    f"its file {name}.lance/data/{f.path} holds {n:,} rows, the table's manifest "
                    f"says {md.physical_rows:,} (replaced)"
                )
            files, size = files + 1, size + (f.file_size_bytes or 0)
    return True, f"{files} data file(s), {size:,} bytes, {ds.count_rows():,} rows"


def _slab_header(bank: Bank, ds):
    """(ok, detail, header or None): the slab's header and file sizes against the table."""
    if slabs.slab_dir(bank) is None:
        return True, "no slab (a bank on an object store): readers use Lance", None
    rows = ds.count_rows()
    header = slabs.read_header(bank, ds.version)
    if rows == 0 or header is None:
        return True, "no slab for this version: readers use Lance", None
    if header.get("format") != slabs.FORMAT:
        return (
            True,
            (
                f"format {header.get('format')} slab (no per-row checksums): not read; the next "
                f"`m3 encode` or `m3 rebuild` writes it again"
            ),
            None,
        )
    payload_bytes = len(ds.take([0], columns=["payload"]).column("payload")[0].as_py())
    header = slabs.check(bank, ds, _decode(ds.schema.metadata), payload_bytes, None, rows)
    slabs.read_crcs(bank, ds.version, header)
    return True, f"header matches the table: {rows:,} rows x {payload_bytes:,} B, checksum file intact", header


def _slab_payloads(bank: Bank, version: int):
    try:
        header = slabs.verify_payloads(bank, version)
    except slabs.SlabCorrupt as e:
        return False, f"memories: {e}"
    return True, f"{header['rows']:,} rows x {header['payload_bytes']:,} B match their crc32s"


def _scan(bank: Bank, name: str, ds, header: dict | None):
    """Every column of every row, in batches; the content checks of refs, documents, memories."""
    from pipelines.chunk_step import token_hash
    from pipelines.normalize import content_hash

    want_rows = ds.count_rows()
    rows, bad, first = 0, 0, None
    ids = []
    crcs = slabs.read_crcs(bank, ds.version, header) if name == "memories" and header else None
    digest = slabs.row_digest([], []) if crcs is not None else None
    what = {
        "refs": "content_hash = token_hash(token_ids), n_tokens = len(token_ids)",
        "documents": "content_hash = content_hash(text), n_chars = len(text)",
        "memories": "payloads match the slab's crc32s and (ref_id, content_hash) its digest"
        if crcs is not None
        else None,
    }.get(name)
    try:
        for batch in ds.to_batches():  # batches bounded by row width (storage/bank.py batch_rows)
            n = batch.num_rows
            if name == "refs":
                ids.append(batch.column("ref_id"))
                tok = batch.column("token_ids")
                off = tok.offsets.to_numpy()
                vals = tok.values.to_numpy(zero_copy_only=False)
                hashes = batch.column("content_hash").to_pylist()
                wrong = np.fromiter((token_hash(vals[off[i] : off[i + 1]]) != hashes[i] for i in range(n)), bool, n)
                wrong |= np.diff(off) != batch.column("n_tokens").to_numpy(zero_copy_only=False)
            elif name == "documents":
                text, hashes = batch.column("text").to_pylist(), batch.column("content_hash").to_pylist()
                wrong = np.fromiter((content_hash(t) != h for t, h in zip(text, hashes)), bool, n)
                wrong |= pc.utf8_length(batch.column("text")).to_numpy(zero_copy_only=False) != batch.column(
                    "n_chars"
                ).to_numpy(zero_copy_only=False)
            elif name == "memories" and crcs is not None:
                rid = batch.column("ref_id").to_pylist()
                slabs.row_digest(rid, batch.column("content_hash").to_pylist(), digest)
                block = slabs._fixed_rows(batch.column("payload"), int(header["payload_bytes"]), rid)
                wrong = slabs.row_crcs(block) != crcs[rows : rows + n]
            else:
                wrong = None
            if wrong is not None and wrong.any():
                bad += int(wrong.sum())
                if first is None:
                    i = int(np.flatnonzero(wrong)[0])
                    key = "ref_id" if "ref_id" in batch.schema.names else "doc_id"
                    first = (rows + i, batch.column(key)[i].as_py())
            rows += n
    except M3Error as e:  # a payload of the wrong size (storage/slab.py)
        return False, f"after {rows:,} rows: {e}"
    except Exception as e:  # noqa: BLE001 (the file cannot be decoded: name it when it can be found)
        err = unreadable(bank, [name], e)
        why = str(err).replace("; run `m3 bank verify`", "") if err is not None else _one_line(e)
        return False, f"after {rows:,} rows: {why}"
    got = pa.chunked_array(ids, pa.string()) if name == "refs" else None
    if rows != want_rows:
        return False, f"{rows:,} rows read, the table's manifest counts {want_rows:,}", got
    if bad:
        check = {
            "refs": "content_hash or n_tokens does not match its token_ids",
            "documents": "content_hash or n_chars does not match its text",
            "memories": "payload differs from the crc32 written in the slab",
        }[name]
        return False, f"{bad:,} row(s) whose {check} (first: row {first[0]}, {first[1]!r})", got
    if digest is not None and digest.hexdigest() != header["digest"]:
        return False, "(ref_id, content_hash) of the rows differ from the slab header's digest"
    return True, f"{rows:,} rows read" + (f"; {what}" if what else ""), got


def _subset(emb, ref_ids):
    if ref_ids is None:
        return False, "no readable refs to check the embeddings' ref_ids against"
    got = emb.to_table(columns=["ref_id"]).column("ref_id")
    inside = pc.is_in(got, value_set=ref_ids.combine_chunks())
    missing = len(got) - pc.sum(inside).as_py() if len(got) else 0
    if missing:
        first = pc.filter(got, pc.invert(inside))[0].as_py()
        return False, f"{missing:,} embedding(s) of references not in refs (first: {first!r})"
    return True, f"{len(got):,} ref_ids, all in refs"


def failure(out: dict) -> VerifyError | None:
    """The one-line error of a verification with failures (None when all passed)."""
    failed = [c for c in out["checks"] if not c["ok"]]
    if not failed:
        return None
    names = "; ".join(f"{c['name']}: {c['detail']}" for c in failed[:2])
    more = f"; and {len(failed) - 2} more" if len(failed) > 2 else ""
    return VerifyError(f"{len(failed)} of {len(out['checks'])} check(s) of {out['uri']} FAILED: {names}{more}")


def require_intact(bank: Bank) -> None:
    """The cheap part of verify (`m3 rebuild` runs it before saying "nothing to do"): VerifyError
    naming what failed, in one line, instead of calling a damaged bank up to date."""
    err = failure(verify_bank(bank, quick=True))
    if err is not None:
        raise VerifyError(f"the bank is damaged, not up to date: {err} (run `m3 bank verify`)")


def render(out: dict) -> str:
    checks = out["checks"]
    width = max([len(c["name"]) for c in checks] + [5]) + 2
    lines = [
        f"bank {out['uri']}: {out['what']}{' (quick)' if out['quick'] else ''}",
        "",
        f"{'check':<{width}}{'status':<8}{'s':>7}  detail",
    ]
    for c in checks:
        lines.append(f"{c['name']:<{width}}{'ok' if c['ok'] else 'FAILED':<8}{c['seconds']:>7.2f}  {c['detail']}")
    ok = len(checks) - out["failed"]
    lines += ["", f"{ok} of {len(checks)} checks passed in {out['seconds']:.2f} s"]
    return "\n".join(lines)
