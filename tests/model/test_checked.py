"""model.checked: the one check of a config field's type and range metadata, and the one error
(FieldError) of every rule, for every config section, whether it is built in code or loaded from
YAML (where the error still names key and place)."""

import dataclasses
from dataclasses import dataclass, field

import pytest

from jobs.config import Config, ConfigError, CorpusConfig, DedupConfig, RayConfig, load_config
from jobs.config.infer import EvalConfig
from jobs.config.pair import PairConfig
from jobs.config.train import TrainConfig
from model.checked import FieldError, FieldTypeError, check_fields
from model.config import ModelConfig
from model.errors import M3Error
from pipelines.filters import QualityConfig
from pipelines.minhash import MinHashConfig


@dataclass(frozen=True)
class Knobs:
    n: int = field(default=1, metadata={"ge": 1})
    rate: float = field(default=0.5, metadata={"gt": 0, "le": 1})
    frac: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    mode: str = field(default="a", metadata={"choices": ("a", "b")})
    cap: int | None = field(default=None, metadata={"ge": 4})
    free: int = -7  # no metadata: not checked

    def __post_init__(self):
        check_fields(self)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(n=0), "n: expected a value >= 1, got 0"),
        (dict(rate=0.0), "rate: expected a value > 0, got 0.0"),
        (dict(rate=1.5), "rate: expected a value <= 1, got 1.5"),
        (dict(frac=1.0), "frac: expected a value < 1, got 1.0"),
        (dict(frac=float("nan")), "frac: expected a finite number, got nan"),
        (dict(mode="c"), "mode: expected one of 'a', 'b', got 'c'"),
        (dict(cap=3), "cap: expected a value >= 4, got 3"),
        (dict(n="5"), "n: expected an integer, got '5' (str)"),  # the type first: a range of a string says less
        (dict(n=True), "n: expected an integer, got True (bool)"),  # bool is an int subclass, not a count
        (dict(cap=4.0), "cap: expected an integer or null, got 4.0 (float)"),
    ],
)
def test_each_rule_fails_naming_the_field(kwargs, message):
    with pytest.raises(FieldError) as e:
        Knobs(**kwargs)
    assert str(e.value) == message
    assert e.value.field == next(iter(kwargs))
    assert isinstance(e.value, ValueError) and isinstance(e.value, M3Error)


def test_none_is_allowed_and_fields_without_metadata_are_free():
    assert Knobs(cap=None, free=-100).cap is None
    assert Knobs(n=1, rate=1.0, frac=0.0, mode="b", cap=4).mode == "b"  # the bounds themselves


def test_the_first_bad_field_in_declaration_order_is_reported():
    with pytest.raises(FieldError, match="^n: "):
        Knobs(mode="z", n=0)


def test_a_type_error_is_also_a_typeerror_and_values_are_stored_as_declared():
    with pytest.raises(TypeError) as e:
        Knobs(mode=3)
    assert isinstance(e.value, FieldTypeError) and e.value.field == "mode"
    k = Knobs(rate=1)  # YAML and JSON write 1 for 1.0
    assert k.rate == 1.0 and isinstance(k.rate, float)


def test_check_fields_alone():
    with pytest.raises(FieldError, match=r"^n: expected a value >= 1, got 0$"):
        check_fields(_bad_knobs())


def _bad_knobs():
    k = Knobs()
    object.__setattr__(k, "n", 0)  # past __post_init__, to test check_fields alone
    return k


# --- configs built in code ------------------------------------------------------------------


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: PairConfig(k=0), "k: expected a value >= 1, got 0"),
        (lambda: PairConfig(max_overlap=1.5), "max_overlap: expected a value <= 1, got 1.5"),
        (lambda: PairConfig(max_tokens=0), "max_tokens: expected a value >= 1, got 0"),
        (lambda: TrainConfig(zero_stage=3), "zero_stage: expected a value <= 2, got 3"),
        (lambda: TrainConfig(lr=0.0), "lr: expected a value > 0, got 0.0"),
        (lambda: TrainConfig(heldout_fraction=1.0), "heldout_fraction: expected a value < 1, got 1.0"),
        (lambda: TrainConfig(dtype="fp16"), "dtype: expected one of 'float32', 'bfloat16', got 'fp16'"),
        (lambda: ModelConfig.from_preset("tiny", mem_top_k=0), "mem_top_k: expected a value >= 1, got 0"),
        (lambda: ModelConfig(norm_eps=0.0), "norm_eps: expected a value > 0, got 0.0"),
        (lambda: ModelConfig(score_combine="avg"), "score_combine: expected one of 'sum', 'mean', 'max', got 'avg'"),
        (lambda: DedupConfig(partitions=0), "partitions: expected a value >= 1, got 0"),
        (
            lambda: CorpusConfig(paths=("a",), format="xml"),
            "format: expected one of 'auto', 'jsonl', 'parquet', 'text', got 'xml'",
        ),
        (lambda: RayConfig(object_store_mb=10), "object_store_mb: expected a value >= 64, got 10"),
        (lambda: EvalConfig(tokens=1), "tokens: expected a value >= 2, got 1"),
        (lambda: MinHashConfig(rows=2000), "rows: expected a value <= 1024, got 2000"),
        (lambda: QualityConfig(max_dup_line_frac=1.5), "max_dup_line_frac: expected a value <= 1, got 1.5"),
    ],
)
def test_hand_built_config_out_of_range_names_the_field(build, message):
    with pytest.raises(ValueError) as e:
        build()
    assert str(e.value) == message


def test_hand_built_config_none_allowed_and_cross_field_rules_kept():
    assert PairConfig(max_tokens=None).max_tokens is None
    assert TrainConfig(lr_continual=None, max_tokens=None).lr_continual is None
    assert RayConfig(num_cpus=None).num_cpus is None
    with pytest.raises(ValueError, match=r"^per_chunk: expected at most k=4"):
        PairConfig(k=4, per_chunk=5)
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig.from_preset("tiny", n_kv_heads=3)
    with pytest.raises(FieldError, match="max_words"):
        QualityConfig(min_words=10, max_words=5)


def _sections(obj, prefix=""):
    """Every config section reachable from `obj` (a Config), with its dotted prefix."""
    yield prefix, obj
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _sections(value, f"{prefix}{f.name}.")


def _out_of_range(value, meta):
    """A value of the field's type that breaks its metadata."""
    if "choices" in meta:
        return "no-such-choice"
    step = 1 if isinstance(value, int) and not isinstance(value, bool) else 0.5
    if "ge" in meta:
        return type(value)(meta["ge"] - step)
    if "gt" in meta:
        return type(value)(meta["gt"])
    if "le" in meta:
        return type(value)(meta["le"] + step)
    return type(value)(meta["lt"])


def _ranged_fields():
    for prefix, section in _sections(Config()):
        for f in dataclasses.fields(section):
            if f.metadata:
                default = getattr(section, f.name)
                if default is None:  # optional and unset: a value of its type
                    default = 0 if "ge" in f.metadata or "gt" in f.metadata else "x"
                yield pytest.param(section, f.name, _out_of_range(default, f.metadata), id=f"{prefix}{f.name}")


@pytest.mark.parametrize("section,name,bad", list(_ranged_fields()))
def test_every_section_checks_its_metadata_when_built_in_code(section, name, bad):
    with pytest.raises(ValueError) as e:
        dataclasses.replace(section, **{name: bad})
    assert str(e.value).split(": ")[0].split(".")[-1] == name


def test_every_section_is_covered():
    ids = {p.id.rsplit(".", 1)[0] for p in _ranged_fields() if "." in p.id}
    assert ids >= {
        "ray",
        "corpus",
        "quality",
        "dedup",
        "dedup.minhash",
        "tokenizer",
        "chunking",
        "model",
        "encode",
        "retrieval",
        "pair",
        "train",
        "rebuild",
        "schedule",
        "infer",
        "infer.eval",
    }


# --- the same check, loaded from YAML: the error names the dotted key and its place ---------------


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text("corpus:\n  paths: [a.jsonl]\n" + text)
    return str(path)


@pytest.mark.parametrize(
    "text,message",
    [
        ("pair:\n  k: 0\n", "pair.k ({path}:4): expected a value >= 1, got 0"),
        (
            "train:\n  seed: 1\n  dtype: fp16\n",
            "train.dtype ({path}:5): expected one of 'float32', 'bfloat16', got 'fp16'",
        ),
        ("model:\n  preset: tiny\n  mem_top_k: 0\n", "model.mem_top_k ({path}:5): expected a value >= 1, got 0"),
        ("dedup:\n  minhash:\n    rows: 0\n", "dedup.minhash.rows ({path}:5): expected a value >= 1, got 0"),
        (
            "bank_quality:\n  max_dup_line_frac: 1.5\n",
            "bank_quality.max_dup_line_frac ({path}:4): expected a value <= 1, got 1.5",
        ),
        (
            "pair:\n  k: 4\n  per_chunk: 5\n",
            "pair.per_chunk ({path}:5): expected at most k=4 (the candidates retrieved), got 5",
        ),
    ],
)
def test_yaml_error_names_the_key_and_line(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == message.format(path=path)


@pytest.mark.parametrize(
    "override,message",
    [
        ("pair.max_overlap=2", "pair.max_overlap (--set): expected a value <= 1, got 2.0"),
        ("infer.eval.tokens=1", "infer.eval.tokens (--set): expected a value >= 2, got 1"),
        ("ray.num_cpus=0", "ray.num_cpus (--set): expected a value >= 1, got 0"),
        ("model.score_combine=avg", "model.score_combine (--set): expected one of 'sum', 'mean', 'max', got 'avg'"),
    ],
)
def test_override_error_names_the_key_and_set(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == message


def test_yaml_null_is_allowed_where_the_field_is_optional(tmp_path):
    cfg = load_config(_write(tmp_path, "pair:\n  max_tokens: null\ntrain:\n  lr_continual: null\n"))
    assert cfg.pair.max_tokens is None and cfg.train.lr_continual is None
