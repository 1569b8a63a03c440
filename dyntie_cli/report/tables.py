"""Render report DataFrames as a Rich table, CSV, JSON or Markdown.

``table`` and ``markdown`` are for people: thousands separators, byte counts as KiB/MiB/GiB, rounded floats.
``csv`` and ``json`` are for scripts: raw numbers at full precision, missing values empty (CSV) or null (JSON).

Which cells hold byte counts is read from names, so the queries and this module agree without extra plumbing:
a column whose name contains ``bytes``, or, in a transposed table whose first column is ``quantity``, a row
whose label contains ``bytes``. Columns named ``A / B`` hold ratios and are shown as ``0.3612x``.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import re
import textwrap
from collections.abc import Callable, Sequence
from datetime import date, datetime
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from dyntie_cli.lazy_import import pandas as pd

FORMATS = ("table", "csv", "json", "markdown")
MISSING = "-"
_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
LABEL_COLUMN = "quantity"


def render(df: pd.DataFrame, fmt: str, title: str | None = None, *, width: int | None = None,
           headline: Sequence[str] | None = None) -> str:
    """The DataFrame as text in ``fmt`` (table, csv, json or markdown); ``title`` heads table and markdown.

    ``width`` (table only; a terminal's): fit the table to that many characters -- long column names wrap at
    ``_`` and ``-``, and the columns that still do not fit are left out and named below the table, the others
    in table order. None: every column, however wide (a pipe or a file). The first column and the ``headline``
    columns are shown at any width: names, or patterns such as ``* / *`` (every ratio column); None: the table's
    own, ``df.attrs["headline"]``, which ``run_query`` sets from its named query.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "table":
        return _rich_table(df, title, width, df.attrs.get("headline", ()) if headline is None else headline)
    renderers: dict[str, Callable[[pd.DataFrame, str | None], str]] = {
        "csv": _csv, "json": _json, "markdown": _markdown,
    }
    return renderers[fmt](df, title)


# --- plain values (csv / json) ---------------------------------------------------------------------------


def plain_value(value: Any) -> Any:
    """A JSON-ready Python value: None for missing, lists for arrays, ISO text for times."""
    if isinstance(value, np.ndarray):
        return [plain_value(item) for item in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [plain_value(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return value


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    columns = [str(column) for column in df.columns]
    return [
        {column: plain_value(value) for column, value in zip(columns, row, strict=True)}
        for row in df.itertuples(index=False, name=None)
    ]


def _json(df: pd.DataFrame, title: str | None) -> str:
    # A bare list of records: the shape pandas.read_json and jq users expect; the title is for people only.
    return json.dumps(_records(df), indent=2, allow_nan=False) + "\n"


def _csv_cell(value: Any) -> Any:
    value = plain_value(value)
    if value is None:
        return ""
    if isinstance(value, list):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    return value


def _csv(df: pd.DataFrame, title: str | None) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([str(column) for column in df.columns])
    for row in df.itertuples(index=False, name=None):
        writer.writerow([_csv_cell(value) for value in row])
    return buffer.getvalue()


# --- human values (table / markdown) ---------------------------------------------------------------------


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'; binary units because that is how memory is allocated and reported by torch."""
    size = float(count)
    for unit in _BYTE_UNITS:
        if abs(size) < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_number(value: float) -> str:
    """Integers with separators; floats to a precision that suits their size."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    # Large whole floats are averaged counts (parameters, bytes): decimals there are noise.
    if value.is_integer() and 1000 <= abs(value) < 1e15:
        return f"{int(value):,}"
    if abs(value) >= 1000:
        return f"{value:,.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.4g}"


def _is_ratio_column(column: str) -> bool:
    return " / " in column


def _is_bytes_cell(column: str, label: Any, transposed: bool) -> bool:
    if _is_ratio_column(column):
        return False
    if transposed:
        return column != LABEL_COLUMN and isinstance(label, str) and "bytes" in label
    return "bytes" in column


def human_value(value: Any, *, as_bytes: bool = False, as_ratio: bool = False) -> str:
    """One cell as people read it."""
    if isinstance(value, datetime) and value is not pd.NaT:
        return value.strftime("%Y-%m-%d %H:%M:%S")
    value = plain_value(value)
    if value is None:
        return MISSING
    if isinstance(value, list):  # floats in a list are rounded as a lone float is; whole numbers stay as they are
        return "[" + ", ".join(MISSING if item is None else human_number(item) if isinstance(item, float)
                               else str(item) for item in value) + "]"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if as_bytes:
            return human_bytes(value)
        if as_ratio:  # four figures: a study's ratios differ in the third
            return f"{value:.4g}x"
        return human_number(value)
    return str(value)


def _human_rows(df: pd.DataFrame) -> list[list[str]]:
    columns = [str(column) for column in df.columns]
    transposed = bool(columns) and columns[0] == LABEL_COLUMN
    rows = []
    for row in df.itertuples(index=False, name=None):
        label = row[0] if transposed else None
        rows.append([
            human_value(
                value,
                as_bytes=_is_bytes_cell(column, label, transposed),
                as_ratio=_is_ratio_column(column),
            )
            for column, value in zip(columns, row, strict=True)
        ])
    return rows


def _numeric_columns(df: pd.DataFrame) -> list[bool]:
    """Right-align columns whose present values are all numbers, as spreadsheets do."""
    flags = []
    for column in df.columns:
        values = [plain_value(value) for value in df[column]]
        present = [value for value in values if value is not None]
        flags.append(bool(present) and all(
            isinstance(value, (int, float)) and not isinstance(value, bool) for value in present
        ))
    return flags


def _rich_table(df: pd.DataFrame, title: str | None, width: int | None = None,
                headline: Sequence[str] = ()) -> str:
    rows = _human_rows(df)
    columns = [str(column) for column in df.columns]
    numeric = _numeric_columns(df)
    if width is None:
        # Wide enough that no cell is cut or wrapped: a report read in a pipe or a file must keep every digit.
        return _table_text(columns, numeric, rows, title, range(len(columns)), headers=columns)
    unfinished = _unfinished_rows(df)
    if unfinished:  # laid out as if the status column were left out (the marks widen the first column) ...
        marked = [[f"{row[0]} {UNFINISHED_MARK}", *row[1:]] if i in unfinished else row for i, row in enumerate(rows)]
        text, shown = _fitted(columns, numeric, marked, title, width, headline)
        if columns.index("status") not in shown:
            return text + _wrapped(UNFINISHED_NOTE, width)
    return _fitted(columns, numeric, rows, title, width, headline)[0]  # ... which shows it when it fits


#: beside the run id of a run that did not finish, where the table has no room for its status column
UNFINISHED_MARK = "*"
UNFINISHED_NOTE = (f"{UNFINISHED_MARK} did not finish (stopped, failed or still running): its figures stop at the "
                   "step it reached and are not its result (--wide shows its status).")


def _unfinished_rows(df: pd.DataFrame) -> set[int]:
    """Rows of runs that did not finish, in a table with a ``status`` column that has any."""
    if "status" not in df.columns or not len(df.columns) or df.columns[0] == LABEL_COLUMN:
        return set()
    return {i for i, status in enumerate(df["status"]) if isinstance(status, str) and status != "finished"}


def _wrapped(note: str, width: int) -> str:
    return "\n".join(textwrap.wrap(note, width=max(20, width - 1))) + "\n"


def _fitted(columns: list[str], numeric: list[bool], rows: list[list[str]], title: str | None, width: int,
            headline: Sequence[str]) -> tuple[str, list[int]]:
    """The table fitted to ``width`` characters, and the columns it shows."""
    cells = [max((len(row[i]) for row in rows), default=0) for i in range(len(columns))]
    always = _always_shown(columns, headline)
    rest = [i for i in range(len(columns)) if i not in always]
    best: tuple[tuple[int, ...], list[int], list[str]] | None = None
    # names on one line if every column fits so, else wrapped ever narrower. The layout in which the first and
    # headline columns fit (else the one they overflow least), then the one that keeps the other columns
    # earliest in the table (compared column by column) wins; of equal ones, the one whose names wrap least.
    for name_width in (None, 16, 12, 8):
        headers = [name if name_width is None else wrap_name(name, max(cell, name_width))
                   for name, cell in zip(columns, cells, strict=True)]
        shown = sorted(always)
        overflow = max(0, _table_width(columns, numeric, rows, shown, headers) - width)
        for index in rest:
            trial = sorted([*shown, index])
            if _table_width(columns, numeric, rows, trial, headers) <= width:
                shown = trial
        score = (-overflow, *(index in shown for index in rest))
        if best is None or score > best[0]:
            best = (score, shown, headers)
        if not overflow and len(shown) == len(columns):
            break
    assert best is not None
    _, shown, headers = best
    # headline columns wider than the terminal widen the table rather than lose digits to an ellipsis
    limit = max(width, _table_width(columns, numeric, rows, shown, headers))
    text = _table_text(columns, numeric, rows, title, shown, headers, limit=limit)
    left_out = [columns[i] for i in range(len(columns)) if i not in shown]
    if left_out:
        text += _wrapped(f"{len(left_out)} more column{'s' if len(left_out) > 1 else ''} (--wide shows all, "
                         f"--format csv every digit): {', '.join(left_out)}", width)
    return text, shown


def _always_shown(columns: list[str], headline: Sequence[str]) -> list[int]:
    """The columns no width leaves out: the first (run_id, quantity) and those ``headline`` names or matches."""
    first = [0] if columns else []
    return first + [i for i in range(1, len(columns)) if any(fnmatch.fnmatchcase(columns[i], h) for h in headline)]


def wrap_name(name: str, width: int) -> str:
    """A column name on lines of at most ``width`` characters, broken only after ``_``, ``-`` or ``/``."""
    pieces = re.findall(r"[^_\-/ ]+[_\-/ ]*|[_\-/ ]+", name)
    lines: list[str] = []
    for piece in pieces:
        if lines and len(lines[-1] + piece.rstrip()) <= width:
            lines[-1] += piece
        else:
            lines.append(piece)
    return "\n".join(line.rstrip() for line in lines)


def _table_width(columns: list[str], numeric: list[bool], rows: list[list[str]], shown: Sequence[int],
                 headers: list[str]) -> int:
    """Characters the table needs, its padding included."""
    console = Console(file=io.StringIO(), width=100_000, color_system=None, force_terminal=False)
    return console.measure(_build_table(columns, numeric, rows, None, shown, headers)).maximum


def _build_table(columns: list[str], numeric: list[bool], rows: list[list[str]], title: str | None,
                 shown: Sequence[int], headers: list[str]) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, header_style="bold")
    for i in shown:
        table.add_column(headers[i], justify="right" if numeric[i] else "left", no_wrap=True)
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    return table


def _table_text(columns: list[str], numeric: list[bool], rows: list[list[str]], title: str | None,
                shown: Sequence[int], headers: list[str], limit: int | None = None) -> str:
    table = _build_table(columns, numeric, rows, title, shown, headers)
    widths = [max([*(len(line) for line in headers[i].splitlines()), *(len(row[i]) for row in rows)])
              for i in shown]
    width = max(80, sum(widths) + 3 * len(widths) + 4, len(title or ""))
    if limit is not None:
        width = min(width, limit)  # a title longer than the terminal wraps instead of widening the table
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False, highlight=False)
    console.print(table)
    # Rich pads every line to the console width; trailing blanks only bloat files and diffs.
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(df: pd.DataFrame, title: str | None) -> str:
    columns = [str(column) for column in df.columns]
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(_markdown_cell(column) for column in columns) + " |")
    lines.append("|" + "|".join("---:" if numeric else "---" for numeric in _numeric_columns(df)) + "|")
    for row in _human_rows(df):
        lines.append("| " + " | ".join(_markdown_cell(cell) for cell in row) + " |")
    return "\n".join(lines) + "\n"
