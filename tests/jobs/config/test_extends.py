"""A config can extend another and state only what differs."""

from pathlib import Path

import pytest

from jobs.config import ConfigError, load_config


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_extends_merges_mappings_and_replaces_the_rest(tmp_path):
    write(tmp_path / "base" / "base.yaml", "name: base\ncorpus:\n  paths: [a.jsonl, b.jsonl]\n  text_key: body\n"
                                           "dedup:\n  minhash: {bands: 10, rows: 8}\nbank_quality:\n  min_words: 3\n")
    child = write(tmp_path / "child.yaml", "extends: base/base.yaml\ncorpus:\n  paths: [c.jsonl]\n"
                                           "dedup:\n  minhash: {bands: 12}\nbank_quality: null\n")
    cfg = load_config(child)
    assert cfg.name == "base"                                     # inherited
    assert cfg.corpus.paths == ("c.jsonl",)                       # a list replaces
    assert cfg.corpus.text_key == "body"                          # a sibling key stays
    assert (cfg.dedup.minhash.bands, cfg.dedup.minhash.rows) == (12, 8)  # mappings merge, deeply
    assert cfg.bank_quality is None                               # null replaces a section
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
