"""`m3 bank stats`: rows, versions and tags of every table, bytes on disk, and what a memory costs.

Bytes answer "why is the bank directory 40 GB?": per table, `live` = the files the kept builds
(the newest rebuild.keep_builds published ones) reference, `dead` = every other file in the
table's directory: versions retention or `m3 bank compact` will delete, plus what they keep on
purpose (tags, a write newer than the live build) and small manifest/transaction files. A table no
build names (neighbors, runs) counts its latest version as live. live + dead = the directory.
The payload slabs of `memories` versions (storage/slab.py: derived copies beside the tables)
are counted on their own line: they are in no table's directory.

Warm and cold (paper §3.1, cold start): of the references of the live build (latest without
one), how many have a memory stored in `memories` or written back at serving by its model,
codec and sparsity (storage/warm.py), and how many are cold (none yet: encoded on first
retrieval).

A table that cannot be read (a truncated or damaged file) is one line naming the table and the
file, and saying to run `m3 bank verify` (storage/bank.py `readable`), not a traceback.
"""

from __future__ import annotations

import math

from storage.bank import Bank, _decode, readable, unreadable
from storage.footprint import TableFiles
from storage.live import read_manifest
from storage.retention import kept_builds
from storage.slab import footprint
from storage.sql import query
from storage.warm import key_of, read_warm


def dense_bytes(model) -> int:
    """Bytes of the full bf16 KV cache of one reference over every layer and query head: the
    paper's 'dense' reference point (7.17 PB for its bank)."""
    return model["n_layers"] * model["n_heads"] * model["ref_max_tokens"] * model["head_dim"] * 2 * 2


def bank_stats(bank: Bank, keep_builds: int = 3) -> dict:
    with readable(bank):
        return _bank_stats(bank, keep_builds)


def _bank_stats(bank: Bank, keep_builds: int) -> dict:
    tables = {}
    manifest = read_manifest(bank)
    builds = kept_builds(manifest, keep_builds) if manifest else []
    for name in bank.tables():  # through Lance alone: LanceDB's import is ~1.3 s of the command
        ds = bank.dataset(name)
        kept = {h["versions"][name] for h in builds if name in h["versions"]} or {ds.version}
        live, dead = TableFiles(bank, name).live_dead(kept)
        tables[name] = {
            "rows": ds.count_rows(),
            "version": ds.version,
            "versions": len(ds.versions()),
            "tags": bank.tags(name),
            "live_bytes": live,
            "dead_bytes": dead,
        }
    out = {
        "uri": bank.uri,
        "tables": tables,
        "kept_builds": [h.get("build") for h in builds],
        "live_bytes": sum(t["live_bytes"] for t in tables.values()),
        "dead_bytes": sum(t["dead_bytes"] for t in tables.values()),
        "slabs": footprint(bank),
    }
    if "memories" in tables:
        meta = _decode(bank.dataset("memories").schema.metadata)
        with readable(bank, "memories"):
            _, rows = query(
                bank,
                "SELECT codec, count(*), avg(octet_length(payload)), any_value(shape) FROM memories GROUP BY codec",
            )
        model = meta["config"]["model"]
        dense = dense_bytes(model)
        out["memories"] = {
            "model_hash": meta.get("model_hash"),
            "codec": meta.get("codec"),
            "quantizer_hash": meta.get("quantizer_hash"),
            "dense_bytes_per_ref": dense,
            **warm_cold(bank, meta),
            "by_codec": [
                {
                    "codec": c,
                    "rows": n,
                    "bytes_per_ref": round(b, 1),
                    "sparse_bf16_bytes": math.prod(shape) * 2,
                    "ratio_vs_dense": round(dense / b, 1),
                }
                for c, n, b, shape in rows
            ],
        }
    return out


def warm_cold(bank: Bank, meta: dict) -> dict:
    """One join in DuckDB over the key columns, streamed from each table (Python sets of every
    reference's key took 0.67 s at 111k references and grew with the bank, bench/scale.py)."""
    import duckdb

    from storage.live import live_versions

    live = live_versions(bank)
    con = duckdb.connect(":memory:")
    for name in ("refs", "memories"):
        with readable(bank, name):
            ds = bank.dataset(name, version=live.get(name))
            cols = ["ref_id", "content_hash"] + (["model_hash"] if name == "memories" else [])
            con.register(f"t_{name}", ds.scanner(columns=cols).to_reader())
    con.register("t_warm", read_warm(bank, key_of(meta), meta.get("model_hash"), columns=["ref_id", "content_hash"]))
    try:
        n_refs, stored, written = con.execute(
            """WITH r AS (SELECT DISTINCT ref_id, content_hash FROM t_refs),
                m AS (SELECT DISTINCT ref_id, content_hash FROM t_memories WHERE model_hash = ?),
                w AS (SELECT DISTINCT ref_id, content_hash FROM t_warm)
           SELECT count(*), count(m.ref_id), count(w.ref_id) FILTER (WHERE m.ref_id IS NULL)
           FROM r LEFT JOIN m USING (ref_id, content_hash) LEFT JOIN w USING (ref_id, content_hash)""",
            [meta.get("model_hash")],
        ).fetchone()
    except duckdb.Error as e:  # a scan failed inside DuckDB: the damaged file, named (storage/bank.py)
        err = unreadable(bank, ("refs", "memories"), e)
        if err is None:
            raise
        raise err from e
    return {
        "refs": n_refs,
        "warm_stored": stored,
        "warm_written_back": written,
        "warm": stored + written,
        "cold": n_refs - stored - written,
    }


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return ""


def render(stats: dict) -> str:
    lines = [
        f"bank {stats['uri']}",
        "",
        f"{'table':<16}{'rows':>10}{'version':>9}{'versions':>10}{'live':>10}{'dead':>10}  tags",
    ]
    mb = lambda n: f"{human_bytes(n):>10}"  # noqa: E731
    for name, t in stats["tables"].items():
        tags = ", ".join(f"{k}->v{v}" for k, v in t["tags"].items()) or "-"
        lines.append(
            f"{name:<16}{t['rows']:>10,}{t['version']:>9}{t['versions']:>10}"
            f"{mb(t['live_bytes'])}{mb(t['dead_bytes'])}  {tags}"
        )
    kept = ", ".join(str(b) for b in stats["kept_builds"]) or "none published: latest versions"
    lines.append(f"{'total':<45}{mb(stats['live_bytes'])}{mb(stats['dead_bytes'])}  live = kept builds ({kept})")
    slabs = stats.get("slabs")
    if slabs:
        held = ", ".join(f"v{v}" for v in slabs["versions"]) or "none"
        lines.append(
            f"{'slabs':<16}{slabs['files']:>10,} files{'':<13}{mb(slabs['bytes'])}  payload copies of "
            f"memories versions {held} ({slabs['dir']})"
        )
    mem = stats.get("memories")
    if mem:
        lines += [
            "",
            f"memories of model {mem['model_hash'][:16]}... (quantizer {mem['quantizer_hash'] or '-'})",
            f"  dense bf16 KV of one reference (all layers and query heads): {mem['dense_bytes_per_ref']:,} B",
            f"  warm {mem['warm']:,} of {mem['refs']:,} refs ({mem['warm_stored']:,} in memories, "
            f"{mem['warm_written_back']:,} written back at serving), cold {mem['cold']:,} (no memory yet: "
            f"encoded on first retrieval)",
        ]
        for c in mem["by_codec"]:
            lines.append(
                f"  {c['codec']:<9} {c['rows']:>9,} refs  {c['bytes_per_ref']:>10,.1f} B/ref  "
                f"(sparse bf16 {c['sparse_bf16_bytes']:,} B)  {c['ratio_vs_dense']:,.0f}x smaller than dense"
            )
    return "\n".join(lines)
