"""`m3 bank diff A B`: what changed between two published builds.

References: added (ref_id only in B), removed (only in A), changed (in both, other content_hash:
the document's text or tokenizer changed). Memories: re-encoded = new (ref_id only in B's
memories) + changed (in both, other model_hash or other payload bytes), removed, unchanged.
Computed by DuckDB over the two pinned versions of each table (Lance datasets scanned through
Arrow, only the columns compared), so nothing is loaded whole into Python.
"""

from __future__ import annotations

import duckdb

from storage.bank import Bank
from storage.builds import BuildError, resolve_build, table_versions

_REFS = """SELECT CASE WHEN a.ref_id IS NULL THEN 'added' WHEN b.ref_id IS NULL THEN 'removed'
                       WHEN a.content_hash <> b.content_hash THEN 'changed' ELSE 'unchanged' END AS kind,
                  coalesce(b.ref_id, a.ref_id) AS ref_id
           FROM ta a FULL OUTER JOIN tb b USING (ref_id)"""
_MEMORIES = """SELECT CASE WHEN a.ref_id IS NULL THEN 'new' WHEN b.ref_id IS NULL THEN 'removed'
                           WHEN a.model_hash <> b.model_hash OR a.payload <> b.payload THEN 'changed'
                           ELSE 'unchanged' END AS kind,
                      coalesce(b.ref_id, a.ref_id) AS ref_id
               FROM ta a FULL OUTER JOIN tb b USING (ref_id)"""
KINDS = {"refs": ("added", "removed", "changed", "unchanged"), "memories": ("new", "changed", "removed", "unchanged")}


def _compare(bank: Bank, table: str, va: int, vb: int, columns: list[str], sql: str, examples: int) -> dict:
    for v in (va, vb):
        if v not in table_versions(bank, table):
            raise BuildError(f"table {table} version {v} is no longer on disk (removed by retention)")
    con = duckdb.connect(":memory:")
    con.register("ta", bank.dataset(table, version=va, check=False).scanner(columns=columns).to_reader())
    con.register("tb", bank.dataset(table, version=vb, check=False).scanner(columns=columns).to_reader())
    con.execute(f"CREATE TEMP TABLE d AS {sql}")
    counts = dict(con.execute("SELECT kind, count(*) FROM d GROUP BY kind").fetchall())
    out = {k: counts.get(k, 0) for k in KINDS[table]}
    out["examples"] = {
        k: [
            r[0]
            for r in con.execute(
                "SELECT ref_id FROM d WHERE kind = ? ORDER BY ref_id LIMIT ?", [k, examples]
            ).fetchall()
        ]
        for k in KINDS[table]
        if k != "unchanged" and out[k]
    }
    return out


def diff_builds(bank: Bank, a: str | int, b: str | int, examples: int = 5) -> dict:
    """Counts and example ref_ids of what changed in refs and memories from build `a` to `b`."""
    ea, eb = resolve_build(bank, a), resolve_build(bank, b)
    out = {"a": {k: ea[k] for k in ("build", "versions")}, "b": {k: eb[k] for k in ("build", "versions")}}
    va, vb = ea["versions"], eb["versions"]
    if "refs" in va and "refs" in vb:
        out["refs"] = _compare(bank, "refs", va["refs"], vb["refs"], ["ref_id", "content_hash"], _REFS, examples)
    if "memories" in va and "memories" in vb:
        mem = _compare(
            bank, "memories", va["memories"], vb["memories"], ["ref_id", "model_hash", "payload"], _MEMORIES, examples
        )
        out["memories"] = {"re_encoded": mem["new"] + mem["changed"], **mem}
    return out


def render(d: dict) -> str:
    lines = [f"build {d['a']['build']} -> build {d['b']['build']}"]
    for table in ("refs", "memories"):
        if table not in d:
            lines.append(f"{table}: not in both builds")
            continue
        t = d[table]
        head = [f"re-encoded {t['re_encoded']:,}"] if table == "memories" else []
        lines.append(
            f"{table} (v{d['a']['versions'][table]} -> v{d['b']['versions'][table]}): "
            + ", ".join(head + [f"{k} {t[k]:,}" for k in KINDS[table]])
        )
        for kind, ids in t["examples"].items():
            lines.append(f"  {kind:<8} e.g. {', '.join(ids)}")
    return "\n".join(lines)
