"""WSD learning-rate schedule: phase shapes, continuity at the boundaries, endpoints, validation."""

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.checked import FieldError
from model.schedule import DECAYS, WSDConfig, lr_at, lr_lambda


@st.composite
def configs(draw):
    total = draw(st.integers(1, 5000))
    decay_fraction = draw(st.floats(0, 1))
    decay_steps = math.floor(decay_fraction * total + 0.5)
    warmup = draw(st.integers(0, total - min(total, decay_steps)))
    decay = draw(st.sampled_from(DECAYS))
    ratio = draw(st.floats(1e-3 if decay == "exp" else 0.0, 1.0))
    return WSDConfig(
        peak_lr=draw(st.floats(1e-6, 1.0)),
        warmup_steps=warmup,
        total_steps=total,
        decay_fraction=decay_fraction,
        min_lr_ratio=ratio,
        decay=decay,
    )


def test_fields_are_plain_typed_for_yaml_introspection():
    for f in dataclasses.fields(WSDConfig):
        assert f.type in (int, float, str), f.name


def test_paper_shape():
    cfg = WSDConfig(peak_lr=3e-4, warmup_steps=100, total_steps=1000)  # decay: last 10 %, exp
    assert (cfg.decay_steps, cfg.decay_start) == (100, 900)
    assert lr_at(0, cfg) == 0.0
    assert lr_at(50, cfg) == pytest.approx(1.5e-4)
    assert lr_at(100, cfg) == lr_at(500, cfg) == lr_at(900, cfg) == 3e-4
    assert lr_at(950, cfg) == pytest.approx(3e-4 * 0.1**0.5)  # geometric halfway point
    assert lr_at(1000, cfg) == pytest.approx(3e-5)
    assert lr_at(5000, cfg) == pytest.approx(3e-5)  # past the end: the final rate


@pytest.mark.parametrize("decay, halfway", [("linear", 0.55), ("cosine", 0.55), ("exp", 0.1**0.5)])
def test_decay_kinds_halfway(decay, halfway):
    cfg = WSDConfig(peak_lr=1.0, warmup_steps=0, total_steps=200, decay_fraction=0.5, min_lr_ratio=0.1, decay=decay)
    assert lr_at(0, cfg) == 1.0  # no warmup: starts at the peak
    assert lr_at(150, cfg) == pytest.approx(halfway)
    assert lr_at(200, cfg) == pytest.approx(0.1)


def test_decay_to_zero_and_no_decay():
    cfg = WSDConfig(peak_lr=1.0, warmup_steps=10, total_steps=100, min_lr_ratio=0.0, decay="cosine")
    assert lr_at(100, cfg) == 0.0
    flat = WSDConfig(peak_lr=1.0, warmup_steps=10, total_steps=100, decay_fraction=0.0)
    assert lr_at(100, flat) == lr_at(1000, flat) == 1.0


@settings(max_examples=200, deadline=None)
@given(configs())
def test_monotone_pieces(cfg):
    lrs = [lr_at(s, cfg) for s in range(cfg.total_steps + 2)]
    warm = lrs[: cfg.warmup_steps + 1]
    assert all(a <= b for a, b in zip(warm, warm[1:]))
    assert set(lrs[cfg.warmup_steps : cfg.decay_start + 1]) == {cfg.peak_lr}
    tail = lrs[cfg.decay_start :]
    assert all(a >= b * (1 - 1e-12) for a, b in zip(tail, tail[1:]))
    assert all(0 <= x <= cfg.peak_lr for x in lrs)


@settings(max_examples=200, deadline=None)
@given(configs())
def test_continuous_at_phase_boundaries(cfg):
    # A jump would show as a change of order peak_lr; the slope is at most ~7 peak_lr per step
    # (exp decay from ratio 1e-3 in one step), so 1e-7 steps away the rate moves < 1e-6 peak_lr.
    eps, tol = 1e-7, 1e-5 * cfg.peak_lr
    for b in {cfg.warmup_steps, cfg.decay_start, cfg.total_steps}:
        at = lr_at(b, cfg)
        if b > 0:
            assert abs(lr_at(b - eps, cfg) - at) <= tol
        assert abs(lr_at(b + eps, cfg) - at) <= tol


@settings(max_examples=100, deadline=None)
@given(configs())
def test_endpoints(cfg):
    assert lr_at(0, cfg) == (0.0 if cfg.warmup_steps else cfg.peak_lr)
    if cfg.warmup_steps <= cfg.decay_start:
        assert lr_at(cfg.warmup_steps, cfg) == cfg.peak_lr
    end = cfg.min_lr if cfg.decay_steps else cfg.peak_lr
    assert lr_at(cfg.total_steps, cfg) == pytest.approx(end)
    assert lr_lambda(cfg)(cfg.total_steps) == pytest.approx(end / cfg.peak_lr)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(peak_lr=0.0), "peak_lr"),
        (dict(peak_lr=float("nan")), "peak_lr"),
        (dict(peak_lr="3e-4"), "peak_lr"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(warmup_steps=1.5), "warmup_steps"),
        (dict(total_steps=0, warmup_steps=0), "total_steps"),
        (dict(decay_fraction=1.5), "decay_fraction"),
        (dict(min_lr_ratio=-0.1), "min_lr_ratio"),
        (dict(min_lr_ratio=0.0), "min_lr_ratio"),  # exp cannot reach 0
        (dict(decay="step"), "decay"),
        (dict(warmup_steps=950), "warmup_steps"),  # runs into the last 100 (decay) steps
        (dict(total_steps=True), "total_steps"),
    ],
)
def test_validation_names_the_field(kwargs, field):
    base = dict(peak_lr=3e-4, warmup_steps=100, total_steps=1000)
    with pytest.raises(FieldError) as e:  # the one config error (model/checked.py), naming the field
        WSDConfig(**{**base, **kwargs})
    assert e.value.field == field and str(e.value).startswith(f"{field}: expected ")


@pytest.mark.parametrize("step", [-1, float("nan"), "3", None])
def test_bad_step(step):
    with pytest.raises(ValueError, match="step"):
        lr_at(step, WSDConfig(peak_lr=1.0, warmup_steps=1, total_steps=10))


def test_frozen():
    cfg = WSDConfig(peak_lr=1.0, warmup_steps=1, total_steps=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.peak_lr = 2.0
