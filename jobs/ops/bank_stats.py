"""`m3 bank stats`: rows, versions and tags of every table, and what a memory costs to store."""

from __future__ import annotations

import math

from storage.bank import Bank
from storage.sql import query


def dense_bytes(model) -> int:
    """Bytes of the full bf16 KV cache of one reference over every layer and query head: the
    paper's 'dense' reference point (7.17 PB for its bank)."""
    return model["n_layers"] * model["n_heads"] * model["ref_max_tokens"] * model["head_dim"] * 2 * 2


def bank_stats(bank: Bank) -> dict:
    tables = {}
    for name in bank.tables():
        tbl = bank.table(name)
        tables[name] = {"rows": tbl.count_rows(), "version": tbl.version, "versions": len(tbl.list_versions()),
                        "tags": bank.tags(name)}
    out = {"uri": bank.uri, "tables": tables}
    if "memories" in tables:
        meta = bank.metadata("memories")
        _, rows = query(bank, "SELECT codec, count(*), avg(octet_length(payload)), any_value(shape) "
                              "FROM memories GROUP BY codec")
        model = meta["config"]["model"]
        dense = dense_bytes(model)
        out["memories"] = {
            "model_hash": meta.get("model_hash"), "codec": meta.get("codec"),
            "quantizer_hash": meta.get("quantizer_hash"), "dense_bytes_per_ref": dense,
            "by_codec": [{"codec": c, "rows": n, "bytes_per_ref": round(b, 1),
                          "sparse_bf16_bytes": math.prod(shape) * 2,
                          "ratio_vs_dense": round(dense / b, 1)} for c, n, b, shape in rows],
        }
    return out


def render(stats: dict) -> str:
    lines = [f"bank {stats['uri']}", "", f"{'table':<16}{'rows':>10}{'version':>9}{'versions':>10}  tags"]
    for name, t in stats["tables"].items():
        tags = ", ".join(f"{k}->v{v}" for k, v in t["tags"].items()) or "-"
        lines.append(f"{name:<16}{t['rows']:>10,}{t['version']:>9}{t['versions']:>10}  {tags}")
    mem = stats.get("memories")
    if mem:
        lines += ["", f"memories of model {mem['model_hash'][:16]}... (quantizer {mem['quantizer_hash'] or '-'})",
                  f"  dense bf16 KV of one reference (all layers and query heads): {mem['dense_bytes_per_ref']:,} B"]
        for c in mem["by_codec"]:
            lines.append(f"  {c['codec']:<9} {c['rows']:>9,} refs  {c['bytes_per_ref']:>10,.1f} B/ref  "
                         f"(sparse bf16 {c['sparse_bf16_bytes']:,} B)  {c['ratio_vs_dense']:,.0f}x smaller than dense")
    return "\n".join(lines)
