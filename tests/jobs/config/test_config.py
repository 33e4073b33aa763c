"""Config errors name the key, the place and what was expected, before any work starts."""

from pathlib import Path

import pytest

from jobs.cli.main import main
from jobs.config import ConfigError, config_hash, load_config

DEMO = "configs/demo.yaml"


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_demo_config_loads_with_the_documented_keys():
    cfg = load_config(DEMO)
    assert cfg.bank.uri == str(Path("bank/demo").absolute())  # absolute: Ray workers run elsewhere
    assert load_config(DEMO, ["bank.uri=s3://b/bank"]).bank.uri == "s3://b/bank"
    assert cfg.corpus.paths == ("data/foldoc/foldoc.jsonl.gz",)
    assert cfg.dedup.minhash.bands == 14 and cfg.dedup.minhash.rows == 8
    assert cfg.chunking.ref_max_tokens == 128


def test_unknown_key_names_file_line_and_nearest_key(tmp_path):
    path = write(tmp_path, "bank:\n  uri: /tmp/x\ncorpus:\n  paths: [a.jsonl]\n  formt: jsonl\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "corpus.formt" in msg and f"{path}:5" in msg and "did you mean 'corpus.format'" in msg


def test_unknown_section_suggests(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'dedupe'.*did you mean 'dedup'"):
        load_config(write(tmp_path, "dedupe: {exact: true}\n"))


def test_wrong_type_names_expected_type(tmp_path):
    path = write(tmp_path, "corpus:\n  paths: [a]\n  records_per_shard: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "corpus.records_per_shard" in str(e.value) and f"{path}:3" in str(e.value)
    assert "expected an integer" in str(e.value)


def test_bool_is_not_an_integer(tmp_path):
    with pytest.raises(ConfigError, match="dedup.partitions.*expected an integer"):
        load_config(write(tmp_path, "dedup:\n  partitions: true\n"))


def test_out_of_range_value(tmp_path):
    with pytest.raises(ConfigError, match=r"dedup.partitions .*:2\).*>= 1, got 0"):
        load_config(write(tmp_path, "dedup:\n  partitions: 0\n"))


def test_choices(tmp_path):
    with pytest.raises(ConfigError, match="corpus.format.*one of 'auto', 'jsonl', 'parquet', 'text'"):
        load_config(write(tmp_path, "corpus:\n  paths: [a]\n  format: xml\n"))


def test_cross_field_rule_reported_at_the_field(tmp_path):
    with pytest.raises(ConfigError, match="chunking.ref_min_tokens.*<= ref_max_tokens"):
        load_config(write(tmp_path, "chunking:\n  ref_max_tokens: 16\n  ref_min_tokens: 32\n"))


def test_nested_step_config_validated(tmp_path):
    with pytest.raises(ConfigError, match="quality.min_words"):
        load_config(write(tmp_path, "quality:\n  min_words: -3\n"))
    with pytest.raises(ConfigError, match="dedup.minhash"):
        load_config(write(tmp_path, "dedup:\n  minhash: {bands: 0}\n"))


def test_overrides_parse_yaml_and_are_located():
    cfg = load_config(DEMO, ["bank.uri=/tmp/elsewhere", "dedup.partitions=3", "corpus.paths=[a, b]"])
    assert cfg.bank.uri == "/tmp/elsewhere" and cfg.dedup.partitions == 3
    assert cfg.corpus.paths == ("a", "b")
    with pytest.raises(ConfigError, match=r"unknown key 'bank.uir' \(--set\).*did you mean 'bank.uri'"):
        load_config(DEMO, ["bank.uir=/tmp/x"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(DEMO, ["bank.uri"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "bank: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_section_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"bank \(.*:1\): expected a mapping"):
        load_config(write(tmp_path, "bank: 3\n"))


def test_config_hash_is_stable_and_sensitive():
    a, b = load_config(DEMO), load_config(DEMO)
    assert config_hash(a.as_dict()) == config_hash(b.as_dict())
    c = load_config(DEMO, ["dedup.partitions=5"])
    assert config_hash(a.as_dict()) != config_hash(c.as_dict())


def test_cli_validate_reports_errors_without_traceback(tmp_path, capsys):
    assert main(["validate", "-c", DEMO]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["validate", "-c", DEMO, "--set", "corpus.paths=[missing.jsonl]"]) == 2
    err = capsys.readouterr().err
    assert "'missing.jsonl' does not exist" in err and "Traceback" not in err


def test_model_section_is_a_preset_plus_overrides(tmp_path):
    cfg = load_config(DEMO, ["model.preset=paper-2.4b", "model.n_layers=46"])
    assert cfg.model.n_layers == 46 and cfg.model.n_mem_layers == 22 and cfg.model.head_dim == 80
    assert load_config(DEMO).model.d_model == 256  # the demo's "small"
    with pytest.raises(ConfigError, match="model.preset.*'tiny', 'small', 'paper-2.4b'.*'huge'"):
        load_config(DEMO, ["model.preset=huge"])
    with pytest.raises(ConfigError, match=r"unknown key 'model.n_layer' \(--set\).*did you mean 'model.n_layers'"):
        load_config(DEMO, ["model.n_layer=3"])
    path = write(tmp_path, "model:\n  preset: tiny\n  d_model: 33\n")
    with pytest.raises(ConfigError, match=rf"model.d_model \({path}:3\).*n_heads\*head_dim"):
        load_config(path)


def test_model_vocab_is_the_tokenizers():
    with pytest.raises(ConfigError, match=r"^model.vocab_size \(--set\): expected tokenizer.vocab_size \(8192\)"):
        load_config(DEMO, ["model.vocab_size=4096"])


def test_corpus_roles_are_keyed_by_an_entry_of_paths(tmp_path):
    cfg = load_config(write(tmp_path, "corpus:\n  paths: [kb.jsonl, 'web/*.jsonl']\n  roles: {kb.jsonl: bank}\n"))
    assert cfg.corpus.roles == {"kb.jsonl": "bank"}
    assert [cfg.corpus.role_of(p) for p in cfg.corpus.paths] == ["bank", "both"]
    assert load_config(DEMO).corpus.roles == {}  # every source is for both by default
    path = write(tmp_path, "corpus:\n  paths: [kb.jsonl]\n  roles:\n    other.jsonl: bank\n")
    with pytest.raises(ConfigError, match=rf"corpus.roles \({path}:3\): 'other.jsonl' is not an entry of corpus.paths"):
        load_config(path)
    with pytest.raises(
        ConfigError, match=r"corpus.roles .*role of 'kb.jsonl' must be one of bank, training, both, got 'knowledge'"
    ):
        load_config(write(tmp_path, "corpus:\n  paths: [kb.jsonl]\n  roles: {kb.jsonl: knowledge}\n"))
    with pytest.raises(ConfigError, match=r"corpus.roles \(--set\): expected a mapping of a string to a string"):
        load_config(DEMO, ["corpus.roles=[bank]"])
    with pytest.raises(ConfigError, match=r"corpus.roles\['kb.jsonl'\].*expected a string"):
        load_config(write(tmp_path, "corpus:\n  paths: [kb.jsonl]\n  roles: {kb.jsonl: 3}\n"))
    # the role is part of the config every ingest key hashes
    assert config_hash(load_config(DEMO, ["corpus.roles={data/foldoc/foldoc.jsonl.gz: bank}"]).corpus) != config_hash(
        load_config(DEMO).corpus
    )


def test_train_control_is_a_checked_key(tmp_path):
    assert load_config(DEMO).train.control is True
    assert load_config(DEMO, ["train.control=false"]).train.control is False
    with pytest.raises(ConfigError, match=r"train.control \(--set\): expected true/false, got 'no'"):
        load_config(DEMO, ["train.control='no'"])


def test_retrieval_method_is_a_checked_key(tmp_path):
    assert load_config(DEMO).retrieval.method == "vector"  # today's retrieval unless a config says otherwise
    assert load_config(DEMO, ["retrieval.method=hybrid"]).retrieval.method == "hybrid"
    with pytest.raises(ConfigError, match=r"retrieval.method .*:2\).*one of 'vector', 'bm25', 'hybrid', got 'tfidf'"):
        load_config(write(tmp_path, "retrieval:\n  method: tfidf\n"))
