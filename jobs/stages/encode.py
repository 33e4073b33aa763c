"""`m3 encode`: every reference of the bank -> its explicit memory, in the `memories` table.

    python -m jobs encode -c configs/demo.yaml

A sharded stage (jobs/stages/runner.py): a pool of Ray Data actors (one model each) encodes
shards of the `refs` table; each shard lands in a staging file, and the table gets one new
version, tagged, when all are done. The key covers the model hash, the refs version and the
codec (with its quantizer): the same key is a finished build ("nothing to do"); an unfinished
one resumes from its staged shards. Memories of unchanged references made by the same model
and codec are copied from the previous table (the rebuild calls this same function), and so are
the memories servers encoded for cold references and wrote back (storage/warm.py).

Cold start (paper §3.1; `encode.cold: true`): the stage encodes nothing. It writes a `memories`
table with the full lineage (model hash, codec, quantizer, sparsity: what a reader binds to)
holding only the rows it can reuse: the previous table's, for unchanged references of the same
model and codec, and the written-back ones. Every other reference is cold, including those added
since: the serving `MemoryStore` encodes one the first time it is retrieved and writes it back.
`cold` is part of the key, so turning it off encodes the references still cold (and only those).
A written-back row reaches `memories` at the next build whose key changes (a new refs version,
another model, `cold` turned off); until then readers find it where it was written back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from jobs.config import Config, config_hash
from jobs.models import model_for_encoding
from jobs.stages.runner import Reuse, ShardedStage, run_stage
from model.checkpoint import memory_reading, saved_hash
from model.codecs import VQCodec, make_codec
from pipelines.encode_step import EncodeShards, encode_tokens
from storage.bank import Bank
from storage.layout import upath
from storage.lock import writes_bank
from storage.schemas import MEMORIES
from storage.slab import SlabCorrupt, SlabError, _fixed_rows, ensure_slab, open_slab, read_header, row_crcs, row_digest
from storage.staging import write_bytes_atomic, write_text_atomic
from storage.warm import read_warm, warm_key


def quantizer(cfg: Config, bank: Bank, mdir: Path, refs_uri: str, n_refs: int) -> dict:
    """Codec arguments; for "vq", train the quantizer on a uniform sample of memories first,
    once: a rerun or a resume finds it by what it was trained from."""
    if cfg.encode.codec != "vq":
        return {}
    qdir = bank.layout.quantizers()
    trained_from = config_hash(
        {
            "model_hash": saved_hash(mdir),
            "refs_version": bank.table("refs").version,
            "spec": cfg.encode.vq_spec,
            "seed": cfg.encode.seed,
            "n": cfg.encode.vq_train_refs,
        }
    )
    known = qdir / f"trained-from-{trained_from}.txt"
    if known.exists() and (qdir / f"{known.read_text().strip()}.faiss").exists():
        qhash = known.read_text().strip()
        return {"quantizer": str(qdir / f"{qhash}.faiss"), "quantizer_hash": qhash}
    from model import load_model

    model = load_model(mdir)
    rng = np.random.default_rng(cfg.encode.seed)
    rows = np.sort(rng.choice(n_refs, size=min(n_refs, cfg.encode.vq_train_refs), replace=False))
    import lance

    tokens = lance.dataset(refs_uri).take(rows, columns=["token_ids"]).column("token_ids").to_pylist()
    raw = make_codec("raw-fp32")
    m = model.config
    shape = (m.n_mem_layers, 2, m.n_kv_heads, m.mem_top_k, m.head_dim)
    vectors = []
    for lo in range(0, len(tokens), 64):
        payloads, _, _ = encode_tokens(model, raw, tokens[lo : lo + 64])
        mems = raw.decode_batch(payloads, shape).numpy()
        vectors.append(mems.reshape(-1, m.head_dim))
    vq = VQCodec.train(np.concatenate(vectors), spec=cfg.encode.vq_spec, seed=cfg.encode.seed)
    path = qdir / f"{vq.quantizer_hash}.faiss"
    if not path.exists():
        write_bytes_atomic(path, vq.to_bytes())
    write_text_atomic(known, vq.quantizer_hash)
    return {"quantizer": str(path), "quantizer_hash": vq.quantizer_hash}


def encode_key(cfg: Config, bank: Bank, mhash: str, codec_kw: dict) -> str:
    """What a memories table is a function of: same key, same table (the rebuild shares it, so
    `m3 encode` after a rebuild finds nothing to do)."""
    return config_hash(
        {
            "model_hash": mhash,
            "refs": bank.metadata("refs").get("ingest_key"),
            "refs_version": bank.table("refs").version,
            "codec": cfg.encode.codec,
            "quantizer": codec_kw.get("quantizer_hash"),
            "batch_size": cfg.encode.batch_size,
            "refs_per_shard": cfg.encode.refs_per_shard,
            **({"cold": True} if cfg.encode.cold else {}),
        }
    )


def memories_lineage(cfg: Config, key: str, mhash: str, mdir: Path, refs_meta: dict, codec_kw: dict) -> dict:
    return {
        "stage": "encode",
        "encode_key": key,
        "model_hash": mhash,
        "model_dir": str(mdir),
        "tokenizer_hash": refs_meta.get("tokenizer_hash"),
        "corpus_version": refs_meta.get("corpus_version"),
        "ingest_key": refs_meta.get("ingest_key"),
        "codec": cfg.encode.codec,
        "quantizer_hash": codec_kw.get("quantizer_hash"),
        "quantizer_path": codec_kw.get("quantizer"),
        "sparsity": sparsity(cfg),
        "trained_to_read": memory_reading(mdir),
        "config": cfg.as_dict(),
        "cold": cfg.encode.cold,
        "warm_key": warm_key(mhash, cfg.encode.codec, codec_kw.get("quantizer_hash"), sparsity(cfg)),
    }


def sparsity(cfg: Config) -> dict:
    m = cfg.model
    return {
        "top_k": m.mem_top_k,
        "score_combine": m.score_combine,
        "n_mem_layers": m.n_mem_layers,
        "ref_max_tokens": m.ref_max_tokens,
    }


def codec_args(cfg: Config, bank: Bank, mdir: Path) -> tuple[dict, bool]:
    """The codec's arguments, and whether the old memories' table-level settings (codec,
    sparsity, quantizer) still hold, so that its rows may be reused. A vq table's quantizer is
    kept while it can be: a fresh one would be trained per refs version and reuse nothing."""
    old = bank.metadata("memories") if bank.has("memories") else {}
    same = bool(old) and old.get("sparsity") == sparsity(cfg) and old.get("codec") == cfg.encode.codec
    if same and cfg.encode.codec == "vq" and old.get("quantizer_path") and upath(old["quantizer_path"]).exists():
        return {"quantizer": old["quantizer_path"], "quantizer_hash": old["quantizer_hash"]}, True
    refs = bank.dataset("refs")
    codec_kw = quantizer(cfg, bank, mdir, refs.uri, refs.count_rows())
    return codec_kw, same and old.get("quantizer_hash") == codec_kw.get("quantizer_hash")


def checked_copy(bank: Bank, note: Callable[[str], None] = print):
    """`Reuse.check` of memories: a memory copied from the old table into the new version must
    be the bytes it was written with. Each copied payload is checked against the crc32 the old
    version's payload slab recorded for its row (storage/slab.py; computed from Lance's payloads
    when the slab was written); a row that differs is copied from the slab instead when the
    slab's row passes the same check, and is otherwise one BankError (nothing is written or
    published). Without it, a payload damaged in Lance became the new version's, and the new
    slab and its checksums, written from that version, then said it was sound. An old version
    without a slab that mirrors it (an object store, a format-1 slab, its checksum file damaged)
    is copied as read: there is nothing to check it against."""
    from storage.bank import BankError, _decode

    def check(old):
        try:
            if read_header(bank, old.version) is None or old.count_rows() == 0:  # no slab (an object store)
                return None
        except ValueError:  # a header that is not JSON: no slab to check against
            return None
        ids = old.to_table(columns=["ref_id", "content_hash"])
        nbytes = len(old.take([0], columns=["payload"]).column("payload")[0].as_py())
        try:
            slab = open_slab(
                bank,
                old,
                _decode(old.schema.metadata),
                nbytes,
                row_digest(ids.column("ref_id").to_pylist(), ids.column("content_hash").to_pylist()).hexdigest(),
            )
        except (SlabError, OSError):  # a slab that does not mirror this version, or its files cannot be read
            return None
        if getattr(slab, "crcs", None) is None:
            slab.close()
            return None

        def checked(batch: pa.RecordBatch, start: int) -> pa.RecordBatch:
            rid = batch.column("ref_id").to_pylist()
            block = _fixed_rows(batch.column("payload"), nbytes, rid)
            bad = np.flatnonzero(row_crcs(block) != slab.crcs[start : start + batch.num_rows])
            if not len(bad):
                return batch
            rows = bad + start
            try:
                repaired = slab.read(rows)
            except SlabCorrupt:
                raise BankError(
                    f"the memory of reference {rid[bad[0]]!r} (memories version {old.version}, row "
                    f"{int(rows[0])}) is damaged in both Lance and the payload slab: it differs from the "
                    f"checksum written with it; not copying it into a new version of memories (nothing "
                    f"was published: the live build is intact); run `m3 bank verify`"
                ) from None
            note(
                f"encode: {len(bad)} memory payload(s) of memories version {old.version} differ from their checksums "
                f"in Lance (first: reference {rid[bad[0]]!r}, row {int(rows[0])}): copied from the payload slab, "
                f"which holds them intact; run `m3 bank verify`"
            )
            payload = block.copy()
            payload[bad] = repaired
            at = batch.schema.get_field_index("payload")
            field = batch.schema.field(at)
            return batch.set_column(at, field, pa.array([row.tobytes() for row in payload], field.type))

        return checked

    return check


def encode_stage(cfg: Config, bank: Bank, label: str = "encode", note: Callable[[str], None] = print) -> ShardedStage:
    mdir = model_for_encoding(cfg, bank)
    mhash = saved_hash(mdir)
    codec_kw, reusable = codec_args(cfg, bank, mdir)
    key = encode_key(cfg, bank, mhash, codec_kw)
    refs_meta, refs, e = bank.metadata("refs"), bank.dataset("refs"), cfg.encode
    return ShardedStage(
        name="encode",
        table="memories",
        key_field="encode_key",
        key=key,
        schema=MEMORIES,
        input_uri=refs.uri,
        n_rows=refs.count_rows(),
        rows_per_shard=e.refs_per_shard,
        actor=EncodeShards,
        actor_kw={"model_dir": str(mdir), "codec": e.codec, "codec_kw": codec_kw, "batch_size": e.batch_size},
        actors=e.actors,
        threads=e.threads_per_actor,
        reuse=Reuse("model_hash", mhash, table_ok=reusable, check=checked_copy(bank, note)),
        compute=not e.cold,
        extra=lambda: read_warm(bank, warm_key(mhash, e.codec, codec_kw.get("quantizer_hash"), sparsity(cfg)), mhash),
        lineage=lambda files: {**memories_lineage(cfg, key, mhash, mdir, refs_meta, codec_kw), "stage": label},
    )


def memories_slab(bank: Bank, version: int, note: Callable[[str], None]) -> str:
    """The payload slab of the committed version (storage/slab.py), written once: what the
    MemoryStore reads a batch of memories from. Serving falls back to Lance without one, so a
    table that cannot be slabbed is a note, not a failed build."""
    try:
        header = ensure_slab(bank, version)
    except SlabError as e:
        note(f"encode: no payload slab for memories version {version} ({e}); readers use Lance")
        return "refused"
    if header is None:
        return "none"  # a bank on an object store, or an empty table: readers use Lance
    return "written"


@writes_bank("encode")  # the bank's write lock (storage/lock.py), reentrant under m3 run / rebuild
def run_encode(cfg: Config, label: str = "encode", note: Callable[[str], None] = print) -> dict:
    """Returns the memories `version` written or found up to date, and the `refs_version` it
    was built from (a rebuild publishes exactly these)."""
    bank = Bank.of(cfg)
    bank.require("refs")
    refs_version = bank.table("refs").version
    stage = encode_stage(cfg, bank, label, note)
    model_hash = stage.reuse.producer
    note(f"encode: model {model_hash[:12]}, codec {cfg.encode.codec}")
    out = run_stage(stage, bank, cfg.ray, note)
    out.update(model_hash=model_hash, references=stage.n_rows, refs_version=refs_version)
    out["slab"] = memories_slab(bank, out["version"], note)
    if out["status"] == "built":
        out["refs_per_s"] = round(out["computed"] / max(out["compute_seconds"], 1e-9), 1)
        note(
            f"encode: {stage.n_rows - out.get('cold', 0):,} memories ({cfg.encode.codec}), {out['computed']:,} computed, as memories "
            f"version {out['version']} in {out['seconds']:.1f} s ({out['refs_per_s']:,.0f} refs/s)"
            + (f"; {out['cold']:,} reference(s) left cold (encode.cold)" if out.get("cold") else "")
        )
    return out
