"""One validation path: every config dataclass checks its types and ranges through
model.checked.check_fields, every rule raises a FieldError naming its field, and the loader
reports that field (FieldError.field), at its file:line, --set or flag."""

import ast
import dataclasses
from pathlib import Path

import pytest

from jobs.config import Config, ConfigError, load_config
from model.checked import FieldError, FieldTypeError
from model.schedule import WSDConfig

ROOT = Path(__file__).resolve().parents[3]
# the modules that declare config dataclasses
MODULES = [
    "jobs/config/__init__.py",
    "jobs/config/infer.py",
    "jobs/config/pair.py",
    "jobs/config/rebuild.py",
    "jobs/config/train.py",
    "model/config.py",
    "model/schedule.py",
    "pipelines/filters.py",
    "pipelines/minhash.py",
]


def _sections(obj, prefix=""):
    yield prefix, obj
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _sections(value, f"{prefix}{f.name}.")


SECTIONS = [*_sections(Config()), ("wsd.", WSDConfig(peak_lr=1e-3, warmup_steps=1, total_steps=10))]


@pytest.mark.parametrize(
    "section,name", [pytest.param(s, f.name, id=f"{p}{f.name}") for p, s in SECTIONS for f in dataclasses.fields(s)]
)
def test_every_field_of_every_section_checks_its_type_in_code(section, name):
    with pytest.raises(FieldTypeError) as e:
        dataclasses.replace(section, **{name: object()})
    assert e.value.field == name and isinstance(e.value, TypeError)


def _post_init_raises(path: str):
    tree = ast.parse((ROOT / path).read_text())
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__post_init__"):
            for node in ast.walk(fn):
                if isinstance(node, ast.Raise) and node.exc is not None:
                    call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                    yield cls.name, getattr(call, "id", ast.unparse(call))


@pytest.mark.parametrize("path", MODULES)
def test_every_rule_raises_a_field_error(path):
    """A rule raises FieldError (model.checked.require is its one-line form), never a bare
    ValueError whose message the loader would have to parse for the field."""
    raised = list(_post_init_raises(path))
    assert all(name == "FieldError" for _, name in raised), raised
    source = (ROOT / path).read_text()
    assert "check_fields(self)" in source


def test_the_loader_reads_the_field_not_the_message():
    # the message names pair.max_tokens before anything else: the error is still train.max_tokens'
    with pytest.raises(ConfigError, match=r"^train.max_tokens \(--set\): expected at most pair.max_tokens \(256\)"):
        load_config("configs/demo.yaml", ["pair.max_tokens=256", "train.max_tokens=300"])
    loader = (ROOT / "jobs" / "config" / "loader.py").read_text()
    assert "import re\n" not in loader


def test_an_element_is_named_by_its_index(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("corpus:\n  paths: [a.jsonl, 3]\n  roles: {a.jsonl: 4}\n")
    with pytest.raises(ConfigError, match=rf"^corpus.paths\[1\] \({path}:2\): expected a string, got 3 \(int\)$"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^infer.eval.probes\[0\] \(--set\): expected the path of a JSONL file"):
        load_config("configs/demo.yaml", ["infer.eval.probes=['  ']"])


def test_a_field_error_is_a_value_error_with_its_parts():
    e = FieldError("k", "a value >= 1", 0)
    assert (str(e), e.field, e.reason, e.got) == (
        "k: expected a value >= 1, got 0",
        "k",
        "expected a value >= 1, got 0",
        0,
    )
    free = FieldError("uri", "a bank cannot live at a ftp:// URI")
    assert str(free) == "uri: a bank cannot live at a ftp:// URI" and isinstance(free, ValueError)


def test_non_finite_numbers_are_refused():
    with pytest.raises(ConfigError, match=r"^rebuild.lock_stale_s \(--set\): expected a finite number, got inf$"):
        load_config("configs/demo.yaml", ["rebuild.lock_stale_s=.inf"])


def test_a_field_error_survives_pickling():  # how an error raised in a Ray worker reaches the driver
    import pickle

    for e in (
        FieldError("k", "a value >= 1", 0),
        FieldError("uri", "free text"),
        FieldTypeError("n", "an integer", "5"),
    ):
        back = pickle.loads(pickle.dumps(e))
        assert (type(back), str(back), back.field) == (type(e), str(e), e.field)
