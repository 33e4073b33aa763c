"""Cron expressions for `m3 schedule`: parse, and the next time one fires.

    Cron.parse("*/15 * * * *").next_after(datetime.now())      # 5 fields: minute hour dom month dow
    Cron.parse("*/2 * * * * *")                                # 6 fields: a seconds field first

Fields take `*`, numbers, ranges `a-b`, steps `*/n` and `a-b/n`, and comma lists; months and
weekdays also take names (jan, mon). Day of week is 0-7 with 0 and 7 both Sunday. As in Vixie
cron, when both day of month and day of week are restricted a day matches if either does.
Times are naive local times (what system cron uses); the scheduler passes `datetime.now()`.

In-house rather than a dependency: ~100 lines, and the seconds field (which keeps the schedule
test to seconds) is not in the standard syntax the small cron libraries implement.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from model.errors import M3Error

_MONTHS = {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}
_DAYS = {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}
# (name, low, high, names) per field, seconds first
_FIELDS = [
    ("second", 0, 59, {}),
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),
]


class CronError(M3Error, ValueError):
    pass


def _value(text: str, name: str, lo: int, hi: int, names: dict) -> int:
    v = names.get(text.lower()) if not text.isdigit() else int(text)
    if v is None or not lo <= v <= hi:
        raise CronError(f"{name} field: {text!r} is not a value in {lo}-{hi}")
    return v


def _field(text: str, name: str, lo: int, hi: int, names: dict) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        body, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) < 1:
                raise CronError(f"{name} field: step {step_text!r} in {part!r} must be a positive integer")
            step = int(step_text)
        if body == "*":
            a, b = lo, hi
        elif "-" in body:
            a_text, _, b_text = body.partition("-")
            a, b = _value(a_text, name, lo, hi, names), _value(b_text, name, lo, hi, names)
            if a > b:
                raise CronError(f"{name} field: range {body!r} runs backwards")
        else:
            a = _value(body, name, lo, hi, names)
            b = hi if step_text else a  # "5/15" means from 5 every 15, as in Vixie cron
        out.update(range(a, b + 1, step))
    return frozenset(out)


@dataclass(frozen=True)
class Cron:
    text: str
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool  # day of month is "*"
    any_weekday: bool  # day of week is "*"

    @classmethod
    def parse(cls, text: str) -> "Cron":
        parts = text.split()
        if len(parts) == 5:
            parts = ["0", *parts]
        if len(parts) != 6:
            raise CronError(
                f"cron expression {text!r}: expected 5 fields (minute hour day-of-month month "
                f"day-of-week) or 6 (a seconds field first), got {len(parts)}"
            )
        sets = [_field(p, *spec) for p, spec in zip(parts, _FIELDS)]
        weekdays = frozenset(d % 7 for d in sets[5])
        return cls(text, *sets[:5], weekdays, parts[3].startswith("*"), parts[5].startswith("*"))

    def _day_ok(self, d: datetime) -> bool:
        if d.month not in self.months:
            return False
        dom, dow = d.day in self.days, (d.weekday() + 1) % 7 in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow

    def next_after(self, t: datetime) -> datetime:
        """The first time strictly after `t` (to the second) that the expression matches."""
        t = t.replace(microsecond=0) + timedelta(seconds=1)
        limit = t + timedelta(days=366 * 8)  # covers every leap-day schedule
        while t < limit:
            if not self._day_ok(t):
                t = (t + timedelta(days=1)).replace(hour=0, minute=0, second=0)
                continue
            if t.hour not in self.hours:
                t = (t + timedelta(hours=1)).replace(minute=0, second=0)
                continue
            if t.minute not in self.minutes:
                t = (t + timedelta(minutes=1)).replace(second=0)
                continue
            if t.second not in self.seconds:
                t += timedelta(seconds=1)
                continue
            return t
        raise CronError(f"cron expression {self.text!r} never fires (e.g. 30 February)")
