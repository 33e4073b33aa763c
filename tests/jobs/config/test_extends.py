"""A config can extend another and state only what differs; keys that follow from another are
derived; the shipped configs resolve to what they were before either existed (their hashes key
existing banks' memos and lineage)."""

import json
from pathlib import Path

import pytest

from jobs.config import ConfigError, chunking_key, config_hash, load_config

ROOT = Path(__file__).resolve().parents[3]
PINNED = json.loads((Path(__file__).parent / "resolved_configs.json").read_text())


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_shipped_configs_resolve_as_before(name):
    """resolved_configs.json: each config resolved (and hashed) before `extends:` and the derived
    keys; the JSON text compares types too (1 is not 1.0 to a hash)."""
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    resolved = cfg.as_dict()
    resolved["bank"]["uri"] = str(Path(resolved["bank"]["uri"]).relative_to(Path.cwd()))
    assert json.dumps(resolved, sort_keys=True) == json.dumps(PINNED[name]["resolved"], sort_keys=True)
    hashes = {
        **{k: config_hash(getattr(cfg, k)) for k in resolved if k != "bank"},
        "chunking_key": config_hash(chunking_key(cfg.chunking)),
        "chunking_key_unpacked": config_hash(chunking_key(cfg.chunking, packing=False)),
        "model_key": f"{config_hash(cfg.model)}-seed{cfg.encode.seed}",
        "pair_knobs": config_hash(cfg.pair.output_knobs()),
    }
    assert hashes == PINNED[name]["hashes"]


def test_science_and_facts_state_only_what_differs():
    demo_lines = len((ROOT / "configs" / "demo.yaml").read_text().splitlines())
    for name in ("science", "facts"):
        text = (ROOT / "configs" / f"{name}.yaml").read_text()
        assert "extends: demo.yaml" in text and len(text.splitlines()) < demo_lines


def test_extends_merges_mappings_and_replaces_the_rest(tmp_path):
    write(
        tmp_path / "base" / "base.yaml",
        "name: base\ncorpus:\n  paths: [a.jsonl, b.jsonl]\n  text_key: body\n"
        "dedup:\n  minhash: {bands: 10, rows: 8}\nbank_quality:\n  min_words: 3\n",
    )
    child = write(
        tmp_path / "child.yaml",
        "extends: base/base.yaml\ncorpus:\n  paths: [c.jsonl]\ndedup:\n  minhash: {bands: 12}\nbank_quality: null\n",
    )
    cfg = load_config(child)
    assert cfg.name == "base"  # inherited
    assert cfg.corpus.paths == ("c.jsonl",)  # a list replaces
    assert cfg.corpus.text_key == "body"  # a sibling key stays
    assert (cfg.dedup.minhash.bands, cfg.dedup.minhash.rows) == (12, 8)  # mappings merge, deeply
    assert cfg.bank_quality is None  # null replaces a section
    assert cfg.source == child


def test_extends_chains_and_is_relative_to_the_file_that_says_it(tmp_path):
    write(tmp_path / "a" / "root.yaml", "corpus:\n  paths: [r.jsonl]\ndedup:\n  partitions: 2\n")
    write(tmp_path / "a" / "b" / "mid.yaml", "extends: ../root.yaml\ndedup:\n  partitions: 3\nname: mid\n")
    leaf = write(tmp_path / "leaf.yaml", "extends: a/b/mid.yaml\nname: leaf\n")
    cfg = load_config(leaf, ["dedup.exact=false"])
    assert (cfg.name, cfg.dedup.partitions, cfg.corpus.paths, cfg.dedup.exact) == ("leaf", 3, ("r.jsonl",), False)


def test_an_error_in_a_base_names_the_base_file_and_line(tmp_path):
    base = write(tmp_path / "base.yaml", "corpus:\n  paths: [a.jsonl]\npair:\n  k: 0\n")
    leaf = write(tmp_path / "leaf.yaml", "extends: base.yaml\nname: x\n")
    with pytest.raises(ConfigError, match=rf"^pair.k \({base}:4\): expected a value >= 1, got 0$"):
        load_config(leaf)
    write(tmp_path / "typo.yaml", "corpus:\n  paths: [a.jsonl]\n  formt: jsonl\n")
    with pytest.raises(ConfigError, match=r"unknown key 'corpus.formt' \(.*typo.yaml:3\)"):
        load_config(write(tmp_path / "leaf2.yaml", "extends: typo.yaml\n"))


def test_a_cycle_is_refused_naming_it(tmp_path):
    a = write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\ncorpus:\n  paths: [x]\n")
    with pytest.raises(ConfigError) as e:
        load_config(a)
    msg = str(e.value)
    assert msg.startswith(f"extends ({tmp_path / 'b.yaml'}:1): a cycle (") and "a config cannot extend itself" in msg
    assert f"{tmp_path / 'a.yaml'} -> {tmp_path / 'b.yaml'} -> {tmp_path / 'a.yaml'}" in msg
    me = write(tmp_path / "me.yaml", "name: x\nextends: me.yaml\n")
    with pytest.raises(ConfigError, match=r"^extends \(.*me.yaml:2\): a cycle"):
        load_config(me)


def test_extends_must_name_a_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^extends \(.*:1\): config file not found: .*nope.yaml"):
        load_config(write(tmp_path / "c.yaml", "extends: nope.yaml\n"))
    with pytest.raises(ConfigError, match=r"^extends \(.*:1\): expected the path of another config file"):
        load_config(write(tmp_path / "d.yaml", "extends: [a.yaml]\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'extends' \(--set\)"):
        load_config(None, ["extends=configs/demo.yaml"])  # a file says what it extends, not the command line


# --- derived keys ---------------------------------------------------------------------------


def test_derived_keys_follow_their_source_when_left_out(tmp_path):
    cfg = load_config(
        write(
            tmp_path / "c.yaml",
            "corpus:\n  paths: [a]\ntokenizer:\n  vocab_size: 600\n"
            "chunking:\n  seq_len: 256\nmodel:\n  preset: tiny\n"
            "  ref_max_tokens: 128\ntrain:\n  max_tokens: 192\n",
        )
    )
    assert cfg.model.vocab_size == 600  # = tokenizer.vocab_size (over the preset's 128)
    assert cfg.model.max_seq_len == 256  # = chunking.seq_len
    assert cfg.pair.chunk_size == 16  # = model.mem_chunk_size (the tiny preset's)
    assert cfg.pair.max_tokens == 192  # = train.max_tokens
    sets = load_config(
        "configs/demo.yaml",
        ["tokenizer.vocab_size=600", "chunking.seq_len=256", "model.mem_chunk_size=32", "train.max_tokens=128"],
    )
    assert (sets.model.vocab_size, sets.model.max_seq_len, sets.pair.chunk_size, sets.pair.max_tokens) == (
        600,
        256,
        32,
        128,
    )


def test_a_stated_key_wins_and_an_explicit_null_stays():
    cfg = load_config("configs/demo.yaml", ["model.max_seq_len=4096", "pair.max_tokens=null", "train.max_tokens=null"])
    assert cfg.model.max_seq_len == 4096 and cfg.pair.max_tokens is None
    assert load_config("configs/facts.yaml").model.max_seq_len == 512  # reads past its 64 trained tokens


def test_a_given_tokenizer_keeps_the_models_vocab(tmp_path):
    """tokenizer.vocab_size is what a trained tokenizer aims at; a given tokenizer.json has its own."""
    cfg = load_config("configs/demo.yaml", ["tokenizer.path=tok.json", "tokenizer.vocab_size=600"])
    assert cfg.model.vocab_size == 8192  # the preset's
    assert load_config("configs/demo.yaml", ["tokenizer.path=tok.json", "model.vocab_size=500"]).model.vocab_size == 500


@pytest.mark.parametrize(
    "sets,message",
    [
        (
            ["tokenizer.vocab_size=600", "model.vocab_size=700"],
            r"^model.vocab_size \(--set\): expected tokenizer.vocab_size \(600\), .* got 700$",
        ),
        (
            ["model.mem_chunk_size=32", "pair.chunk_size=64"],
            r"^pair.chunk_size \(--set\): expected model.mem_chunk_size \(32\): .* got 64$",
        ),
    ],
)
def test_stating_both_sides_differently_names_the_key(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/demo.yaml", sets)


def test_a_derived_keys_error_points_at_its_source(tmp_path):
    path = write(tmp_path / "c.yaml", "corpus:\n  paths: [a]\nchunking:\n  seq_len: 24\n  align_docs: true\n")
    with pytest.raises(
        ConfigError,
        match=rf"^chunking.seq_len \({path}:4\): expected a multiple of "
        rf"model.mem_chunk_size \(64\) with chunking.align_docs, got 24$",
    ):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^pair.max_tokens \(= train.max_tokens\): expected an integer or null"):
        load_config("configs/demo.yaml", ["train.max_tokens=many"])  # pair comes before train


def test_equal_keys_built_in_code_are_checked_too():
    import dataclasses

    cfg = load_config("configs/demo.yaml")
    with pytest.raises(ValueError, match=r"^pair.chunk_size: expected model.mem_chunk_size \(64\)"):
        dataclasses.replace(cfg, pair=dataclasses.replace(cfg.pair, chunk_size=32))
