"""Shares over time and summaries from rows made anywhere: list times and EXIF times, per-period counts that add up,
changes flagged only when chance is unlikely, and `summarize` rebuilding analyze's outputs exactly (CSV or Parquet,
any row order, a photo met twice counted once)."""
from __future__ import annotations

import csv
import random
import re
import shutil

import pytest
from conftest import cli_error, cli_json
from PIL import Image

from carapp import safecsv
from carapp.analysis.analyze import COLUMNS
from carapp.analysis.trends import compare_periods, period_of, significant

MONTHS = ["2026-03", "2026-04", "2026-05"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _photo(path, colour, taken: str | None = None):
    """A JPEG, with EXIF DateTimeOriginal when `taken` ("2026:03:04 10:00:00")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if taken:
        exif.get_ifd(0x8769)[0x9003] = taken
    Image.new("RGB", (48, 36), colour).save(path, exif=exif)


def _predictions(path, shares: dict[str, dict[str, float]], n: int, seed: int = 0, untimed: int = 0):
    """A predictions.csv of n photos per month whose makes have the given shares per month (the rest: unsure),
    plus `untimed` photos without a time."""
    rng = random.Random(seed)
    rows = []
    for month in MONTHS:
        for i in range(n):
            pick, status, make = rng.random(), "unsure", "Brightwell"
            for name, share in shares.items():
                if pick < share[month]:
                    status, make = "model", name
                    break
                pick -= share[month]
            rows.append([f"/photos/{month}/{i:04d}.jpg", "city", status, make, 0.9, f"{make} One", 0.8, 0.1,
                         "[]", "" if status == "model" else "Not sure: ...", f"{month}-{1 + i % 28:02d}T12:00:00"])
    rows += [[f"/photos/none/{i}.jpg", "city", "model", "Aurora", 0.9, "Aurora One", 0.8, 0.1, "[]", "", ""]
             for i in range(untimed)]
    with open(path, "w", newline="") as f:
        writer = safecsv.Writer(f)
        writer.writerow(COLUMNS + ["time"])
        writer.writerows(rows)
    return rows


def test_periods_and_times_read_as_a_calendar_does():
    assert period_of("2026-03-31T23:59:00", "month") == "2026-03"
    assert period_of("2026:03:31 23:59:00", "quarter") == "2026-Q1"  # EXIF's own form
    assert period_of("2026-01-01", "week") == "2026-W01" and period_of("2027-01-01", "week") == "2026-W53"
    assert period_of("", "month") == period_of("not a date", "month") == "(no time)"


def test_a_changed_share_is_flagged_and_a_steady_one_is_not(tmp_path):
    shares = {"Aurora": {"2026-03": 0.10, "2026-04": 0.30, "2026-05": 0.30},   # a real jump, then steady
              "Corvane": {"2026-03": 0.20, "2026-04": 0.20, "2026-05": 0.20}}  # steady throughout
    _predictions(tmp_path / "predictions.csv", shares, n=300, untimed=7)
    result = cli_json("summarize", tmp_path / "predictions.csv", "--out", tmp_path / "out", "--period", "month")
    assert result["periods"] == {"2026-03": 300, "2026-04": 300, "2026-05": 300, "(no time)": 7}
    summary = _rows(tmp_path / "out" / "summary.csv")
    assert list(summary[0]) == ["group", "level", "name", "count", "share", "ci_low", "ci_high", "period"]
    for level, name in {(s["level"], s["name"]) for s in summary}:  # the periods add up to the whole, exactly
        for group in ("city", "(all)"):
            mine = [s for s in summary if (s["group"], s["level"], s["name"]) == (group, level, name)]
            whole = [int(s["count"]) for s in mine if s["period"] == "(all)"]
            assert whole == [sum(int(s["count"]) for s in mine if s["period"] != "(all)")]
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Over time (per month" in page and "carapp-trend" in page
    said = re.findall(r"<li>(.*?)</li>", page)
    aurora = [s for s in said if s.startswith("Aurora")]
    assert len(aurora) == 1
    assert re.fullmatch(r"Aurora: ([5-9]|1[0-5])% → (2[5-9]|3[0-5])% from March 2026 to April 2026, p = .*", aurora[0])
    assert any(s.startswith("(no make named): ") and "March 2026 to April" in s for s in said)  # the rest fell
    assert not any("Corvane" in s or "from April 2026 to May 2026" in s for s in said)
    assert "7 photos carry no time" in said[-1]


def test_no_change_is_flagged_among_many_makes_when_nothing_changed():
    """Twelve makes with steady shares over twelve months: 132 comparisons, and the false-discovery control keeps
    chance from being reported (unadjusted, about 5% of them would be under 0.05)."""
    rng = random.Random(1)
    periods = [f"2026-{m:02d}" for m in range(1, 13)]
    totals = dict.fromkeys(periods, 400)
    makes = [f"Make{i}" for i in range(12)]
    counts = {m: {p: sum(rng.random() < 0.06 for _ in range(400)) for p in periods} for m in makes}
    changes = compare_periods(counts, totals, makes)
    assert len(changes) == 132 and significant(changes) == []


def test_list_times_and_exif_times_reach_predictions_and_the_summary(tiny_run, tmp_path):
    photos = tmp_path / "photos"
    _photo(photos / "a.jpg", (200, 30, 30), "2026:03:04 10:00:00")
    _photo(photos / "b.jpg", (30, 200, 30), "2026:04:05 11:00:00")
    _photo(photos / "c.jpg", (30, 30, 200))  # no EXIF time
    listed = tmp_path / "list.csv"
    with open(listed, "w", newline="") as f:
        csv.writer(f).writerows([["path", "group", "time"], [photos / "a.jpg", "x", "2026-06-01"],
                                 [photos / "b.jpg", "x", ""], [photos / "c.jpg", "y", "garbage"]])
    by_list = cli_json("analyze", listed, "--run", tiny_run, "--out", tmp_path / "l", "--workers", "0",
                       "--period", "quarter")
    times = {r["path"].rsplit("/", 1)[-1]: r["time"] for r in _rows(tmp_path / "l" / "predictions.csv")}
    assert times == {"a.jpg": "2026-06-01T00:00:00", "b.jpg": "", "c.jpg": ""}  # the list's, and nothing else
    assert by_list["periods"] == {"2026-Q2": 1, "(no time)": 2}
    by_exif = cli_json("analyze", listed, "--run", tiny_run, "--out", tmp_path / "e", "--workers", "0",
                       "--time", "exif", "--period", "month")
    times = {r["path"].rsplit("/", 1)[-1]: r["time"] for r in _rows(tmp_path / "e" / "predictions.csv")}
    assert times == {"a.jpg": "2026-06-01T00:00:00", "b.jpg": "2026-04-05T11:00:00", "c.jpg": ""}
    assert by_exif["periods"] == {"2026-04": 1, "2026-06": 1, "(no time)": 1}
    plain = cli_json("analyze", photos, "--run", tiny_run, "--out", tmp_path / "p", "--workers", "0")
    assert "time" not in _rows(tmp_path / "p" / "predictions.csv")[0] and "periods" not in plain
    said = cli_error("analyze", photos, "--run", tiny_run, "--out", tmp_path / "p", "--time", "exif")
    assert "without photo times" in said and "--force" in said  # a resume never mixes two layouts


def test_summarize_rebuilds_analyze_outputs_exactly_in_any_order(tiny_run, demo_root, tmp_path):
    photos = tmp_path / "photos"
    for i, path in enumerate(sorted(demo_root.rglob("*.jpg"))[:24]):
        month = 3 + i % 3
        target = photos / ("north" if i % 2 else "south") / f"{i:02d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
        if i % 4:
            Image.open(target).copy().save(target, exif=_exif(f"2026:0{month}:1{i % 9} 09:00:00"))
    out = tmp_path / "a"
    cli_json("analyze", photos, "--run", tiny_run, "--out", out, "--workers", "0", "--time", "exif",
             "--period", "month")
    rows = (out / "predictions.csv").read_text().splitlines(keepends=True)
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    body = rows[1:]
    random.Random(3).shuffle(body)
    # in two files, in another order, with one photo's row again (a retried batch)
    (shuffled / "one.csv").write_text(rows[0] + "".join(body[:10]))
    (shuffled / "two.csv").write_text(rows[0] + "".join(body[10:]) + body[0])
    again = cli_json("summarize", shuffled, "--out", tmp_path / "s", "--period", "month")
    assert again["repeated_rows_skipped"] == 1 and again["images"] == 24
    for name in ("summary.csv", "report.html"):
        assert (tmp_path / "s" / name).read_bytes() == (out / name).read_bytes(), name


def _exif(taken: str) -> Image.Exif:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = taken
    return exif


def test_summarize_reads_parquet_as_it_reads_csv(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    from carapp.analysis.batch import typed
    rows = _predictions(tmp_path / "predictions.csv", {"Aurora": dict.fromkeys(MONTHS, 0.3)}, n=40, untimed=2)
    layout = COLUMNS + ["time"]
    table = typed([[str(v) if isinstance(v, str) else v for v in r] for r in rows], layout)
    assert table["make_prob"].dtype == "float64"
    (tmp_path / "pq").mkdir()
    table.iloc[:50].to_parquet(tmp_path / "pq" / "a.parquet")
    table.iloc[50:].to_parquet(tmp_path / "pq" / "b.parquet")
    cli_json("summarize", tmp_path / "predictions.csv", "--out", tmp_path / "from-csv", "--period", "week")
    cli_json("summarize", tmp_path / "pq", "--out", tmp_path / "from-parquet", "--period", "week")
    for name in ("summary.csv", "report.html"):
        assert (tmp_path / "from-csv" / name).read_bytes() == (tmp_path / "from-parquet" / name).read_bytes()
    assert pd.read_csv(tmp_path / "from-csv" / "summary.csv").period.str.match(r"2026-W\d\d|\(").all()


def test_summarize_refuses_what_is_not_predictions(tmp_path):
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    assert "not a predictions file" in cli_error("summarize", tmp_path / "other.csv", "--out", tmp_path / "o")
    assert "no such file" in cli_error("summarize", tmp_path / "missing.csv", "--out", tmp_path / "o")
    (tmp_path / "empty.csv").write_text(",".join(COLUMNS) + "\n")
    assert "no rows" in cli_error("summarize", tmp_path / "empty.csv", "--out", tmp_path / "o")


def test_the_app_draws_no_empty_trend_chart_and_says_why(tmp_path):
    """Photos with no car and no time (plain colours from a phone without a clock): no chart of nothing, sentences
    instead; with months and makes, a chart with each make."""
    from carapp.ui.analyze_tab import trend_of
    def untimed(answer: list) -> None:  # 12 photos, each with this answer and no time
        with open(tmp_path / "predictions.csv", "w", newline="") as f:
            writer = safecsv.Writer(f)
            writer.writerow(COLUMNS + ["time"])
            writer.writerows([[f"/p/{i}.jpg", "city", *answer, ""] for i in range(12)])
    for answer in (["no-car", "", 0.0, "", 0.0, 2.0, "[]", "No car: ..."],   # no make named
                   ["model", "Aurora", 0.9, "Aurora X", 0.9, 0.1, "[]", ""]):  # makes named, no photo with a time
        untimed(answer)
        figure, said = trend_of(str(tmp_path), "month")
        assert figure is None and "12 photos carry no time" in said
    _predictions(tmp_path / "predictions.csv", {"Aurora": dict.fromkeys(MONTHS, 0.5)}, n=20)
    figure, _ = trend_of(str(tmp_path), "month")
    assert figure is not None and any(trace.name == "Aurora" for trace in figure.data)
