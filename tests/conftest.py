"""Shared fixtures: small real data (FOLDOC entries) and one Ray instance for the whole run."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDOC = ROOT / "data" / "foldoc" / "foldoc.jsonl.gz"

os.environ.setdefault("M3_PROGRESS", "0")


TINY = ["model.preset=tiny", "model.vocab_size=600", "model.ref_max_tokens=128", "model.max_seq_len=512"]


def tiny_settings(corpus, bank, *extra: str) -> list[str]:
    """configs/demo.yaml made tiny for tests that build a whole bank (rebuild, verify, faults):
    the small real corpus, the tiny model, raw memories, one thread per retrieval actor."""
    return [
        f"corpus.paths=[{corpus}]",
        f"bank.uri={bank}",
        "corpus.records_per_shard=100",
        "tokenizer.vocab_size=600",
        "chunking.seq_len=256",
        "ray.num_cpus=2",
        *TINY,
        "encode.refs_per_shard=64",
        "encode.batch_size=16",
        "encode.codec=raw-fp32",
        "retrieval.refs_per_shard=64",
        "retrieval.threads_per_actor=1",
        *extra,
    ]


def foldoc_records(n: int, min_words: int = 0) -> list[dict]:
    """The first n FOLDOC entries with at least min_words words (real text, GFDL)."""
    out = []
    with gzip.open(FOLDOC, "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if len(rec["text"].split()) >= min_words:
                out.append(rec)
                if len(out) == n:
                    break
    return out


def write_foldoc_corpus(path: Path, n: int, min_words: int = 0) -> Path:
    """A gzipped JSONL corpus of the first n FOLDOC entries with at least min_words words."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for rec in foldoc_records(n, min_words):
            f.write(json.dumps(rec) + "\n")
    return path


@pytest.fixture(scope="session")
def ray_local(s3):
    """One embedded Ray for every test that needs it: starting Ray costs seconds. Started after
    the S3 server, with its endpoint in the environment, so its workers can reach a bank on
    s3:// too (a worker's environment is the one Ray started with) and the object-store tests run
    their stages in this process instead of starting an `m3` with a Ray of its own."""
    import ray

    from jobs.config import RayConfig
    from jobs.runtime import init_ray

    init_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


def small_embedded_bank(root: Path, *extra: str):
    """40 long FOLDOC entries ingested (256-token sequences) and embedded with an ANN index
    (threshold lowered so the index path is the one tested). Returns (config, overrides, embed summary)."""
    from jobs.config import load_config
    from jobs.stages.embed import run_embed
    from jobs.stages.ingest import run_ingest

    corpus = write_foldoc_corpus(root / "c.jsonl.gz", 40, min_words=60)
    overrides = [
        f"corpus.paths=[{corpus}]",
        f"bank.uri={root / 'bank'}",
        "tokenizer.vocab_size=600",
        "chunking.seq_len=256",
        "ray.num_cpus=2",
        "retrieval.refs_per_shard=40",
        "retrieval.index_threshold=50",
        "retrieval.threads_per_actor=1",
        *extra,
    ]
    cfg = load_config("configs/demo.yaml", overrides)
    run_ingest(cfg)
    return cfg, overrides, run_embed(cfg)


FACTS = ROOT / "data" / "facts"


def facts_subset(root: Path, n_faq: int = 48, n_other: int = 48) -> tuple[Path, Path, dict[str, str]]:
    """A small slice of the facts corpus (scripts/make_facts.py: invented entities): the first
    n_faq FAQ documents for training, the descriptions of their entities plus n_other others
    for the bank. Returns (bank file, training file, entity id -> its name)."""
    import re

    faqs, names = [], {}
    with gzip.open(FACTS / "train.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["kind"] == "faq":
                faqs.append(rec)
                head = rec["text"].split("\n")[0]  # how bench/facts_pairing.py reads the name
                names[rec["entity"]] = re.match(
                    r"(?:Questions about |A short quiz on )?(.+?)"
                    r"(?:: questions and answers)?\.$",
                    head,
                ).group(1)
                if len(faqs) == n_faq:
                    break
    bank, others = [], 0
    with gzip.open(FACTS / "bank.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["id"] in names or others < n_other:
                others += rec["id"] not in names
                bank.append(rec)
    paths = root / "bank.jsonl.gz", root / "train.jsonl.gz"
    for path, recs in zip(paths, (bank, faqs)):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    return paths[0], paths[1], names


def facts_settings(bank_file: Path, train_file: Path, bank: Path, *extra: str) -> list[str]:
    """--set overrides that make configs/facts.yaml small for tests: a facts_subset corpus (its
    bank file and training file, each with its role) into the bank at `bank`."""
    return [
        f"corpus.paths=[{bank_file}, {train_file}]",
        f"corpus.roles={{{bank_file}: bank, {train_file}: training}}",
        f"bank.uri={bank}",
        "tokenizer.vocab_size=600",
        "model.vocab_size=600",
        "ray.num_cpus=2",
        "corpus.records_per_shard=100",
        "retrieval.refs_per_shard=64",
        "retrieval.threads_per_actor=1",
        *extra,
    ]


def small_facts_bank(root: Path, *extra: str, embed: bool = True):
    """A facts-corpus bank of ~100 descriptions and ~10 training sequences (configs/facts.yaml,
    smaller), ingested and, with `embed`, embedded. Returns (config, overrides, entity names).
    Retrieval is `vector` unless `extra` says otherwise (configs/facts.yaml's is bm25): the
    lexical tests start from the default method and switch."""
    from jobs.config import load_config
    from jobs.stages.embed import run_embed
    from jobs.stages.ingest import run_ingest

    bank_file, train_file, names = facts_subset(root)
    overrides = facts_settings(
        bank_file, train_file, root / "bank", "pair.seqs_per_shard=4", "retrieval.method=vector", *extra
    )
    cfg = load_config("configs/facts.yaml", overrides)
    run_ingest(cfg)
    if embed:
        run_embed(cfg)
    return cfg, overrides, names


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible server for the object-store bank tests: moto's, in-process on
    loopback (MinIO would need a binary this machine cannot download; a real S3 cannot be reached
    from here). Endpoint and credentials go in the standard AWS environment variables, which
    Lance, LanceDB and s3fs all read, so the code under test is the one a real bucket gets. One
    server for the session: s3fs and Lance keep their clients (and the endpoint they read) per
    process. Yields (bucket URI, the environment a subprocess needs)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT": endpoint,
        "AWS_ALLOW_HTTP": "true",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        import boto3
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # one made before would keep another endpoint
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="m3-test")
        yield "s3://m3-test", env
    server.stop()


@pytest.fixture(scope="session")
def edited_facts_bank(tmp_path_factory, ray_local):
    """(Here, not in tests/jobs/inference/conftest.py: the inference and serve tests share one
    build of it per session.) A slice of the facts corpus (tests/conftest.py facts_subset, plus the descriptions of the
    entities data/facts/edits.jsonl edits) published as build 1 by `m3 rebuild`, encoded by a
    tiny reader model saved as training saves one (encode.checkpoint; infer.checkpoint unset, so
    serving finds it through the memories' lineage); then the edits applied to a copy of the bank
    file (scripts/make_facts.py apply_edits) and an incremental rebuild published as build 2.
    Returns a namespace: cfg (build 1's corpus), cfg2 (the edited corpus) and sets2 (its --set
    overrides), ckpt, edits (those of the slice), rebuilds (their summaries), root, settings(bank
    file, *extra) and config(bank file, *extra)."""
    import dataclasses
    import importlib.util
    import types

    import torch

    from jobs.config import load_config
    from jobs.ops.rebuild import run_rebuild
    from model import Memory3, save_model
    from tests.jobs.inference.conftest import FACTS_TINY, write_export

    spec = importlib.util.spec_from_file_location("make_facts", ROOT / "scripts" / "make_facts.py")
    make_facts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_facts)
    root = tmp_path_factory.mktemp("edits")
    bank_file, train_file, _ = facts_subset(root)
    edits = make_facts.read_jsonl(FACTS / "edits.jsonl")
    ids = {e["id"] for e in edits}
    rows = make_facts.read_jsonl(bank_file) + [
        r for r in make_facts.read_jsonl(FACTS / "bank.jsonl.gz") if r["id"] in ids
    ]
    with gzip.open(bank_file, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

    def settings(bank: Path, *extra: str) -> list[str]:  # --set overrides of configs/facts.yaml
        return facts_settings(bank, train_file, root / "bank", *FACTS_TINY, *extra)

    def config(bank: Path, *extra: str):
        return load_config("configs/facts.yaml", settings(bank, *extra))

    torch.manual_seed(0)
    ckpt = save_model(Memory3(dataclasses.replace(config(bank_file).model, init_std=0.2)), root / "reader")
    write_export(config(bank_file), ckpt)
    cfg = config(bank_file, f"encode.checkpoint={ckpt}")
    first = run_rebuild(cfg)
    edited, n = make_facts.apply_edits(edits, bank_file, root / "edited")
    assert n == len(edits)
    cfg2 = config(edited, f"encode.checkpoint={ckpt}")
    second = run_rebuild(cfg2)
    return types.SimpleNamespace(
        cfg=cfg,
        cfg2=cfg2,
        sets2=settings(edited, f"encode.checkpoint={ckpt}"),
        ckpt=Path(ckpt),
        edits=edits,
        rebuilds=(first, second),
        root=root,
        settings=settings,
        config=config,
    )
