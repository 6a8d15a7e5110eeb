"""CSV files that a spreadsheet opens safely: carapp writes names it did not choose (an upload's file name, a zip's
folders) into predictions.csv and summary.csv, and a cell such as `=HYPERLINK(...)` or `=cmd|' /C calc'!A0` would
run as a formula in the analyst's spreadsheet.

OWASP's rule: a text cell that starts with = + - @, a tab or a carriage return gets a leading '. A cell that starts
with ' gets one too, so that reading undoes writing exactly (paths and groups are keys when an analysis resumes or
is summarised). Numbers stay numbers.
"""
from __future__ import annotations

import csv

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def neutral(value):
    """The cell as written: text a spreadsheet would run as a formula, quoted with a leading '."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def original(value: str) -> str:
    """The text that neutral() was given."""
    return value[1:] if value.startswith("'") else value


class Writer:
    """csv.writer whose text cells are neutral()."""

    def __init__(self, f, **options):
        self.writer = csv.writer(f, **options)

    def writerow(self, row) -> None:
        self.writer.writerow([neutral(v) for v in row])

    def writerows(self, rows) -> None:
        for row in rows:
            self.writerow(row)


class DictWriter(csv.DictWriter):
    """csv.DictWriter whose text cells are neutral()."""

    def writerow(self, rowdict):
        return super().writerow({k: neutral(v) for k, v in rowdict.items()})

    def writerows(self, rowdicts):
        for row in rowdicts:
            self.writerow(row)


class DictReader(csv.DictReader):
    """csv.DictReader that gives back each cell's original() text."""

    def __next__(self) -> dict:
        return {k: original(v) if isinstance(v, str) else v for k, v in super().__next__().items()}
