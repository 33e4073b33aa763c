"""Arrow schemas of the bank's tables: the contract every writer and reader shares.

Tools and people query these columns by name (`m3 sql`), so renaming one is a schema change:
bump SCHEMA_VERSION, and readers refuse tables written under another version instead of
misreading them.
"""

import pyarrow as pa

SCHEMA_VERSION = 2

DOCUMENTS = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # the file it came from
        pa.field("source_id", pa.string(), nullable=False),  # its id there (or line/row number)
        pa.field("text", pa.large_string(), nullable=False),  # normalized text
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("n_chars", pa.int64(), nullable=False),
        pa.field("rank", pa.int64(), nullable=False),  # corpus order: (file << 40) | record
        pa.field("meta", pa.string()),  # the record's other fields, JSON
        pa.field("in_training", pa.bool_(), nullable=False),  # passed `quality`: in train_sequences
        pa.field("in_bank", pa.bool_(), nullable=False),  # passed `bank_quality`: in refs
        pa.field("training_reason", pa.string()),  # why training left it out, if it did
    ]
)

REJECTS = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),  # read | quality | dedup
        pa.field("duplicate_of", pa.string()),  # doc_id of the kept twin, for duplicates
        pa.field("raw_prefix", pa.string(), nullable=False),  # the first characters, to eyeball
        pa.field("rank", pa.int64(), nullable=False),
    ]
)

REFS = pa.schema(
    [
        pa.field("ref_id", pa.string(), nullable=False),  # "<doc_id>-<ordinal>"
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("ordinal", pa.int32(), nullable=False),  # position of the reference in its document
        pa.field("start_token", pa.int32(), nullable=False),  # offset of its first token in the document
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),  # of token_ids: what encoding depends on
    ]
)

TRAIN_SEQUENCES = pa.schema(
    [
        pa.field("seq_id", pa.string(), nullable=False),
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("doc_ids", pa.list_(pa.string()), nullable=False),
    ]
)

MEMORIES = pa.schema(
    [
        pa.field("ref_id", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),  # of the reference's token ids
        pa.field("model_hash", pa.string(), nullable=False),  # the model that wrote it
        pa.field("codec", pa.string(), nullable=False),  # how `payload` is coded
        pa.field("shape", pa.list_(pa.int32()), nullable=False),  # (mem layers, 2, kv heads, k, head dim)
        pa.field("n_tokens", pa.int16(), nullable=False),  # kept tokens (< k for short references)
        pa.field("positions", pa.list_(pa.int16()), nullable=False),  # (mem layers, kv heads, k), -1 empty
        pa.field("payload", pa.binary(), nullable=False),
    ]
)

TABLES = {
    "documents": DOCUMENTS,
    "rejects": REJECTS,
    "refs": REFS,
    "train_sequences": TRAIN_SEQUENCES,
    "memories": MEMORIES,
}

# The columns that say a row of a table is the row an earlier version holds: a rebuild keeps such
# rows in the files the builds before share, and writes the rest (storage/table_delta.py). Every
# column but the large one whose content hash is among them (a document's text, a reference's
# token ids).
IDENTITY = {
    "documents": [f.name for f in DOCUMENTS if f.name != "text"],
    "refs": [f.name for f in REFS if f.name != "token_ids"],
}
