"""Shares over time: a photo's time (a list's `time` column, or EXIF DateTimeOriginal) to its week, month or
quarter, and the changes between consecutive periods that chance is unlikely to explain.

Each make's share in one period against the next is a two-proportion test (Pearson's chi-squared on the 2x2 table,
which is the two-sided z-test); the p-values of every make and pair of periods are adjusted together
(Benjamini–Hochberg), so among the changes reported as real about 5% at most are chance.
"""
from __future__ import annotations

import calendar
import io
from dataclasses import dataclass
from datetime import datetime

from PIL import Image

PERIODS = ("week", "month", "quarter")
TIME_SOURCES = ("list", "exif")  # list: a list CSV's time column; exif: that, else the photo's DateTimeOriginal
NO_TIME = "(no time)"            # the period of a photo without a time: counted, never dropped
ALL_PERIODS = "(all)"
EXIF_FORMAT = "%Y:%m:%d %H:%M:%S"
EXIF_IFD, DATE_TIME_ORIGINAL, DATE_TIME = 0x8769, 0x9003, 0x0132
ALPHA = 0.05                     # false-discovery rate of the changes reported


def parse_time(text: str | None) -> datetime | None:
    """An ISO 8601 time or date ("2026-03-04", "2026-03-04T10:00:00Z") or EXIF's "2026:03:04 10:00:00"; None when
    empty or unreadable. A time zone is dropped: a photo's period is its local calendar's."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        try:
            when = datetime.strptime(text[:19], EXIF_FORMAT)
        except ValueError:
            return None
    return when.replace(tzinfo=None)


def normal_time(text: str | None) -> str:
    """The time as predictions.csv holds it (ISO 8601, seconds), or "" when there is none."""
    when = parse_time(text)
    return when.isoformat(timespec="seconds") if when else ""


def exif_time(source) -> str:
    """DateTimeOriginal (else DateTime) of a photo file or its bytes, as normal_time; only the header is read."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            exif = img.getexif()
            value = exif.get_ifd(EXIF_IFD).get(DATE_TIME_ORIGINAL) or exif.get(DATE_TIME)
    except Exception:  # noqa: BLE001 - any header Pillow cannot parse means: no time
        return ""
    finally:
        if hasattr(source, "seek"):
            source.seek(0)
    return normal_time(value.strip("\x00 ") if isinstance(value, str) else None)


def period_of(time_text: str | None, period: str) -> str:
    """"2026-W09", "2026-03" or "2026-Q1" (sortable as text), or NO_TIME."""
    when = parse_time(time_text)
    if when is None:
        return NO_TIME
    if period == "week":
        year, week, _ = when.isocalendar()
        return f"{year}-W{week:02d}"
    if period == "month":
        return f"{when.year}-{when.month:02d}"
    if period == "quarter":
        return f"{when.year}-Q{(when.month - 1) // 3 + 1}"
    raise ValueError(f"--period must be one of {', '.join(PERIODS)}, not {period!r}")


def period_label(period: str) -> str:
    """How a period reads in a sentence: "March 2026", "2026-W09", "2026-Q1"."""
    if len(period) == 7 and period[4] == "-" and period[5:].isdigit():
        return f"{calendar.month_name[int(period[5:])]} {period[:4]}"
    return period


def timed_periods(periods) -> list[str]:
    """The periods with a time, in order (not NO_TIME, not ALL_PERIODS)."""
    return sorted(p for p in periods if p not in (NO_TIME, ALL_PERIODS))


@dataclass(frozen=True)
class Change:
    make: str
    before: str
    after: str
    share_before: float
    share_after: float
    p: float  # adjusted for every comparison made (Benjamini–Hochberg)

    def words(self) -> str:
        return (f"{self.make}: {self.share_before:.0%} → {self.share_after:.0%} from {period_label(self.before)} to "
                f"{period_label(self.after)}, p = {self.p:.2g}")


def compare_periods(counts: dict[str, dict[str, int]], totals: dict[str, int], makes: list[str]) -> list[Change]:
    """Every make's share in each period against the next period that has photos; returns all comparisons with
    their adjusted p-values, smallest first. counts: make → period → count; totals: period → cars (or photos)."""
    from scipy.stats import chi2_contingency, false_discovery_control  # here: the CLI's parser imports PERIODS
    periods = [p for p in timed_periods(totals) if totals[p]]
    tests = []
    for make in makes:
        for before, after in zip(periods, periods[1:]):
            c1, c2, n1, n2 = counts[make].get(before, 0), counts[make].get(after, 0), totals[before], totals[after]
            if c1 + c2 == 0 or c1 + c2 == n1 + n2:  # a column of zeros: no share to compare
                continue
            p = chi2_contingency([[c1, n1 - c1], [c2, n2 - c2]], correction=False).pvalue
            tests.append((make, before, after, c1 / n1, c2 / n2, float(p)))
    if not tests:
        return []
    adjusted = false_discovery_control([t[-1] for t in tests], method="bh")
    changes = [Change(*t[:-1], p=float(q)) for t, q in zip(tests, adjusted)]
    return sorted(changes, key=lambda c: (c.p, c.make, c.before))


def significant(changes: list[Change], alpha: float = ALPHA) -> list[Change]:
    return [c for c in changes if c.p < alpha]
