"""The bank's build stages, each resumable and keyed: ingest, embed, encode and pair, all run by
one stage runner (runner)."""
