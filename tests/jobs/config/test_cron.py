"""The scheduler's cron expressions: known answers, and properties against a brute-force matcher."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.config import ConfigError, load_config
from jobs.config.cron import Cron, CronError


@pytest.mark.parametrize(
    "expr, after, expected",
    [
        ("*/15 * * * *", datetime(2026, 1, 1, 10, 7, 30), datetime(2026, 1, 1, 10, 15)),
        ("0 3 * * *", datetime(2026, 1, 1, 3, 0, 0), datetime(2026, 1, 2, 3, 0)),
        ("30 2 1 * *", datetime(2026, 1, 31, 0, 0), datetime(2026, 2, 1, 2, 30)),
        ("0 0 29 2 *", datetime(2026, 3, 1), datetime(2028, 2, 29)),  # leap day
        ("0 9 * * mon-fri", datetime(2026, 11, 27, 10, 0), datetime(2026, 11, 30, 9, 0)),  # Fri -> Mon
        ("0 0 13 * 5", datetime(2026, 1, 1), datetime(2026, 1, 2)),  # dom OR dow (Vixie)
        ("0 0 * * 7", datetime(2026, 11, 26), datetime(2026, 11, 29)),  # 7 = Sunday
        ("*/2 * * * * *", datetime(2026, 1, 1, 0, 0, 1, 500), datetime(2026, 1, 1, 0, 0, 2)),  # seconds field
        ("5/20 * * * *", datetime(2026, 1, 1, 0, 6), datetime(2026, 1, 1, 0, 25)),
    ],
)
def test_known_next_times(expr, after, expected):
    assert Cron.parse(expr).next_after(after) == expected


@pytest.mark.parametrize(
    "expr, words",
    [
        ("* * * *", "expected 5 fields"),
        ("60 * * * *", "minute field"),
        ("* 24 * * *", "hour field"),
        ("*/0 * * * *", "step"),
        ("5-1 * * * *", "backwards"),
        ("0 0 30 2 *", "never fires"),
        ("* * * foo *", "month field"),
    ],
)
def test_bad_expressions_say_what_is_wrong(expr, words):
    with pytest.raises(CronError, match=words):
        Cron.parse(expr).next_after(datetime(2026, 1, 1))


def test_bad_cron_in_config_names_the_key():
    with pytest.raises(ConfigError, match=r"schedule\.cron .*hour field"):
        load_config("configs/demo.yaml", ["schedule.cron=0 25 * * *"])


def _matches(c: Cron, t: datetime) -> bool:
    return t.second in c.seconds and t.minute in c.minutes and t.hour in c.hours and c._day_ok(t)


field = st.one_of(st.just("*"), st.integers(0, 59).map(str), st.integers(1, 20).map(lambda n: f"*/{n}"))


@settings(max_examples=150, deadline=None)
@given(
    minute=field,
    hour=st.one_of(st.just("*"), st.integers(0, 23).map(str), st.just("1-5,20")),
    dow=st.sampled_from(["*", "1-5", "0", "6,0", "3"]),
    start=st.datetimes(datetime(2025, 1, 1), datetime(2030, 1, 1)),
)
def test_next_is_the_first_matching_time(minute, hour, dow, start):
    """next_after returns a matching time, strictly later, with no matching minute in between."""
    c = Cron.parse(f"{minute} {hour} * * {dow}")
    nxt = c.next_after(start)
    assert nxt > start and _matches(c, nxt)
    t = start.replace(second=0, microsecond=0) + timedelta(minutes=1)
    steps = 0
    while t < nxt and steps < 20000:  # bounded brute force: every minute up to the answer
        assert not _matches(c, t), t
        t += timedelta(minutes=1)
        steps += 1
