"""Render report DataFrames as a Rich table, CSV, JSON or Markdown.

``table`` and ``markdown`` are for people: thousands separators, byte counts as KiB/MiB/GiB, rounded floats.
``csv`` and ``json`` are for scripts: raw numbers at full precision, missing values empty (CSV) or null (JSON).

Which cells hold byte counts is read from names, so the queries and this module agree without extra plumbing:
a column whose name contains ``bytes``, or, in a transposed table whose first column is ``quantity``, a row
whose label contains ``bytes``. Columns named ``A / B`` hold ratios and are shown as ``0.3612x``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from datetime import date, datetime
from typing import Any

import numpy as np
import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table

FORMATS = ("table", "csv", "json", "markdown")
MISSING = "-"
_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
LABEL_COLUMN = "quantity"


def render(df: pd.DataFrame, fmt: str, title: str | None = None) -> str:
    """The DataFrame as text in ``fmt`` (table, csv, json or markdown); ``title`` heads table and markdown."""
    renderers: dict[str, Callable[[pd.DataFrame, str | None], str]] = {
        "table": _rich_table, "csv": _csv, "json": _json, "markdown": _markdown,
    }
    if fmt not in renderers:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
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


def _rich_table(df: pd.DataFrame, title: str | None) -> str:
    rows = _human_rows(df)
    columns = [str(column) for column in df.columns]
    table = Table(title=title, box=box.SIMPLE_HEAD, header_style="bold")
    for column, numeric in zip(columns, _numeric_columns(df), strict=True):
        table.add_column(column, justify="right" if numeric else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    # Wide enough that no cell is cut or wrapped: a report read in a pipe or a file must keep every digit.
    widths = [max([len(column), *(len(row[i]) for row in rows)]) for i, column in enumerate(columns)]
    width = max(80, sum(widths) + 3 * len(widths) + 4, len(title or ""))
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
