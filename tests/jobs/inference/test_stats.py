"""`m3 eval`'s statistics (jobs/inference/stats.py) on hand-made numbers: a gain is weighted like
the losses beside it, so it is their difference even when items differ in length."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jobs.inference.stats import paired, paired_items, paired_rates, summary


def test_a_gain_is_the_difference_of_the_losses_shown_for_items_of_unequal_length():
    # a long item memory does not help, two short ones it helps a lot
    count = np.array([100, 10, 10])
    none = np.array([4.0, 5.0, 5.0]) * count
    mem = np.array([4.0, 4.0, 4.5]) * count
    p = paired((none, count), (mem, count))
    shown = summary(none, count)["loss"] - summary(mem, count)["loss"]
    assert p["gain"] == pytest.approx(shown, abs=1e-4)
    assert p["gain"] == pytest.approx(15 / 120, abs=1e-5)  # (0 + 10 + 5) nats over 120 tokens
    unweighted = np.mean([0.0, 1.0, 0.5])
    assert abs(p["gain"] - unweighted) > 0.3  # what an unweighted mean of item means would say
    assert p["helped"] == 2 and p["of"] == 3
    assert p["relative"] == pytest.approx(p["gain"] / (none.sum() / count.sum()), abs=1e-5)


def test_the_standard_error_is_the_ratio_estimator_s_and_the_plain_one_for_equal_lengths():
    rng = np.random.default_rng(0)
    d = rng.normal(0.1, 0.05, size=20)
    ones = np.ones(20)
    p = paired((d + 3.0, ones), (np.full(20, 3.0), ones))
    assert p["gain"] == pytest.approx(d.mean(), abs=1e-5)
    assert p["stderr"] == pytest.approx(d.std(ddof=1) / math.sqrt(20), abs=1e-5)
    n = rng.integers(5, 50, size=20).astype(float)
    p = paired(((d + 3.0) * n, n), (3.0 * n, n))
    mean = (n * d).sum() / n.sum()
    se = math.sqrt((n**2 * (d - mean) ** 2).sum() * 20 / 19) / n.sum()
    assert p["gain"] == pytest.approx(mean, abs=1e-5) and p["stderr"] == pytest.approx(se, abs=1e-5)


def test_items_scored_in_one_mode_only_are_left_out_and_per_item_pairing_weighs_tokens():
    count_a, count_b = np.array([10, 10, 0, 10]), np.array([10, 10, 10, 10])
    p = paired((np.array([50.0, 40, 0, 30]), count_a), (np.array([40.0, 40, 20, 20]), count_b))
    assert p["of"] == 3 and p["gain"] == pytest.approx(2 / 3, abs=1e-5)
    assert paired((np.array([1.0]), np.array([1])), (np.array([0.5]), np.array([1]))) == {}
    w = paired_items([4.0, 5.0, 5.0], [4.0, 4.0, 4.5], tokens=[100, 10, 10])
    assert w["gain"] == pytest.approx(15 / 120, abs=1e-5)
    assert paired_items([4.0, 5.0, 5.0], [4.0, 4.0, 4.5])["gain"] == pytest.approx(0.5, abs=1e-5)


def test_exact_match_differences_pair_per_item():
    r = paired_rates([False, False, True, True, None], [True, False, True, False, True])
    assert r["gain"] == 0.0 and r["gained"] == 1 and r["lost"] == 1 and r["of"] == 4
    r = paired_rates([False, False, False], [True, True, False])
    assert r["gain"] == pytest.approx(2 / 3, abs=1e-4) and r["stderr"] > 0
