"""`dyntie report --plot KIND`: figures over the registry, written as image files.

Each kind is a loader (one query over the registry) and a drawer (a matplotlib figure from that frame):

* ``ties``    -- the tie state over time: layer by decision, coloured by the root each layer uses, with the
  independent layers (``state[i] == i``) drawn as white bars over their spells; one panel per run.
* ``layers``  -- the paper's bar chart: decisions each layer spent independent; grouped bars for several runs.
* ``memory``  -- peak memory, and parameter + gradient + optimizer bytes, over steps; both axes from zero, and
  the intervals whose peak includes a validation (and its checkpoint) marked.
* ``params``  -- trainable parameters over steps, with the all-independent count for reference.
* ``metrics`` -- validation curves of each run's headline metric (the one it recorded: ppl, accuracy, ...), final
  test marked; one panel per metric.
* ``study``   -- a study's validation curves per variant: the mean over its seeds, the band from the lowest to the
  highest seed (``dyntie report --plot study --study NAME``).

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot: no display is
needed, and nothing global (open figures, the backend) is left behind in the calling process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
from matplotlib import colormaps, patheffects
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap, ListedColormap
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator

from ..errors import DyntieError, UsageError
from ..results.db import read_registry, resolve_run_ids
from ..results.lineage import dense_schedule, newest_finished
from ..results.queries import query_rows

_DPI = 100
# Metrics whose early values span orders of magnitude (perplexity starts near the vocabulary size).
_LOG_SCALE_METRICS = {"ppl"}


@dataclass(frozen=True)
class PlotKind:
    load: Callable[[duckdb.DuckDBPyConnection, list[str]], pd.DataFrame]
    draw: Callable[[pd.DataFrame, dict[str, str]], Figure]
    missing: str  # what a run without rows lacks, as the error message names it
    every_run: bool = True  # every run asked for must have rows (a study draws its finished runs only)


def make_plot(kind: str, db_path: str | os.PathLike[str], run_ids: list[str] | None, out: str | None
              ) -> tuple[Path, str | None]:
    """Draw ``kind`` for ``run_ids`` (default: the main job, ``_chosen_runs``) into ``out`` (default:
    ``<kind>-<first run>.png`` in the working directory); returns the path written and, when no run was named,
    which run was drawn and why, in words."""
    plot = PLOTS.get(kind)
    if plot is None:
        raise UsageError(f"No plot '{kind}'; choose one of: {', '.join(PLOTS)}.")
    path = Path(db_path)
    with read_registry(path) as con:
        ids, chosen = _chosen_runs(con, run_ids, path)
        labels = _run_labels(con, ids)
        data = plot.load(con, ids)
    _require_rows(kind, data, ids if plot.every_run else ids[:0], plot.missing)
    target = _output_path(kind, ids[0], out)
    _save(plot.draw(data, labels), target)
    return target, chosen


# --- runs, output, saving -----------------------------------------------------------------------------------


def _chosen_runs(con: duckdb.DuckDBPyConnection, run_ids: list[str] | None, path: Path
                 ) -> tuple[list[str], str | None]:
    """``run_ids``; else the main job -- the newest finished dynamic run, of gpt2 when there is one (not a newer
    ablation, nor a run stopped after a few steps) -- or, without one, the most recent run, with why in words."""
    if run_ids:
        return resolve_run_ids(con, run_ids, path), None
    main = newest_finished(con)
    if main is not None:
        return [main], f"{main}, the newest finished dynamic run"
    latest = resolve_run_ids(con, None, path)[:1]
    if not latest:
        raise DyntieError(f"The registry {path} has no runs to plot; run a training first "
                          "(dyntie train gpt2).")
    return latest, f"{latest[0]}, the most recent run (no dynamic run has finished)"


def _run_labels(con: duckdb.DuckDBPyConnection, ids: list[str]) -> dict[str, str]:
    """Legend text: the run id with its variant, so ablations read as what they are."""
    rows = query_rows(con, "variants", ids)
    variants = dict(zip(rows.run_id, rows.variant, strict=True))
    return {run_id: f"{run_id} ({variants.get(run_id) or 'unknown'})" for run_id in ids}


def _require_rows(kind: str, data: pd.DataFrame, ids: list[str], missing: str) -> None:
    if data.empty and not ids:
        raise DyntieError(f"Nothing to draw for --plot {kind}: no {missing} yet.")
    present = set(data.run_id)
    absent = [run_id for run_id in ids if run_id not in present]
    if absent:
        who = f"Run {absent[0]} has" if len(absent) == 1 else f"Runs {', '.join(absent)} have"
        raise DyntieError(f"{who} no {missing} for --plot {kind}; wait for the run to log them or choose "
                          "another run (dyntie report --table runs).")


def _output_path(kind: str, first_run: str, out: str | None) -> Path:
    target = Path(out) if out else Path.cwd() / f"{kind}-{first_run}.png"
    supported = FigureCanvasAgg(Figure()).get_supported_filetypes()
    suffix = target.suffix.lower().lstrip(".")
    if suffix not in supported:
        raise UsageError(f"Cannot write a plot to {target}; give --out a file ending in .png (or "
                         f"{', '.join('.' + name for name in sorted(supported) if name != 'png')}).")
    return target


def _save(fig: Figure, target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Attach the Agg canvas explicitly, so no backend is picked from the environment (a display, MPLBACKEND).
        FigureCanvasAgg(fig)
        fig.savefig(target, dpi=_DPI, bbox_inches="tight")
    except OSError as error:
        raise DyntieError(f"Cannot write the plot to {target} ({error.strerror}); pass --out with a writable "
                          "path.") from None


def _byte_scale(largest: float) -> tuple[float, str]:
    """A divisor and unit that keep the axis numbers readable (binary units, as torch reports memory)."""
    for power, unit in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
        if largest >= 1024**power:
            return float(1024**power), unit
    return 1.0, "B"


def _colours(count: int) -> list[tuple[float, float, float, float]]:
    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


# --- ties: layer x decision heatmap -------------------------------------------------------------------------


def _load_ties(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    return query_rows(con, "tie-rows", ids)


def _state_matrix(rows: pd.DataFrame) -> tuple[np.ndarray, int]:
    """Layers x decisions of root indices, from the first logged decision on (gaps keep the earlier state)."""
    states = {int(d): [int(x) for x in s] for d, s in zip(rows.decision, rows.state, strict=True)}
    first = min(states)
    schedule = dense_schedule(states)[first:]
    return np.array(schedule, dtype=int).T, first


def _roots_colormap(layers: int) -> Colormap:
    """One colour per block: hues that can be told apart up to 20 blocks, a sequential map (read by position)
    beyond that."""
    if layers > 20:
        return colormaps["viridis"].resampled(layers)
    return ListedColormap([colour for colour in _colours(layers)])


def _draw_ties(data: pd.DataFrame, labels: dict[str, str]) -> Figure:
    runs = list(labels)
    matrices = {run_id: _state_matrix(data[data.run_id == run_id]) for run_id in runs}
    layers = max(m.shape[0] for m, _ in matrices.values())
    decisions = max(m.shape[1] for m, _ in matrices.values())
    width = min(14.0, 6.0 + 0.05 * decisions)
    height = min(8.0, max(2.5, 1.2 + 0.25 * layers))
    fig = Figure(figsize=(width, height * len(runs)), layout="constrained")
    axes = fig.subplots(len(runs), 1, squeeze=False)[:, 0]
    cmap = _roots_colormap(layers)
    for ax, run_id in zip(axes, runs, strict=True):
        matrix, first = matrices[run_id]
        image, key = _ties_panel(ax, matrix, first, cmap, layers, (width, height))
        ax.set_title(f"tie state: {labels[run_id]}")
    colorbar = fig.colorbar(image, ax=list(axes), label="root block (whose weights the layer uses)")
    if layers <= 24:
        colorbar.set_ticks(range(layers))
    fig.legend(handles=[key], loc="outside lower left", fontsize="small", frameon=False)
    return fig


def _ties_panel(ax: Axes, matrix: np.ndarray, first: int, cmap: Colormap, layers: int,
                panel_in: tuple[float, float]) -> tuple[AxesImage, Line2D]:
    count = matrix.shape[1]
    extent = (first - 0.5, first + count - 0.5, -0.5, matrix.shape[0] - 0.5)
    image = ax.imshow(matrix, origin="lower", aspect="auto", interpolation="nearest", cmap=cmap,
                      vmin=-0.5, vmax=layers - 0.5, extent=extent)
    # Each spell of independence is one white bar through its row: unlike a marker per cell it stays
    # visible when hundreds of decisions squeeze a cell to a pixel, and it shows how long a block stayed free.
    row_pt = panel_in[1] * 72 * 0.8 / matrix.shape[0]
    width = min(6.0, max(1.5, row_pt / 4))
    style = dict(color="white", linewidth=width, solid_capstyle="butt",
                 path_effects=[patheffects.withStroke(linewidth=width + 1.5, foreground="black")])
    for layer, start, end in _independent_spells(matrix):
        ax.plot([first + start - 0.35, first + end + 0.35], [layer, layer], **style)
    ax.set_xlabel("decision")
    ax.set_ylabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if matrix.shape[0] <= 24:
        ax.set_yticks(range(matrix.shape[0]))
    key = Line2D([], [], label="independent (state[i] == i: the layer owns and trains its weights)", **style)
    return image, key


def _independent_spells(matrix: np.ndarray) -> list[tuple[int, int, int]]:
    """(layer, first column, last column) of every run of consecutive columns where the layer is its own root."""
    spells = []
    for layer, row in enumerate(matrix):
        free = np.concatenate(([False], row == layer, [False])).astype(int)
        edges = np.flatnonzero(np.diff(free))
        spells += [(layer, int(start), int(stop) - 1) for start, stop in zip(edges[::2], edges[1::2], strict=True)]
    return spells


# --- layers: decisions each layer spent independent ---------------------------------------------------------


def _load_layers(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    return query_rows(con, "layer-counts", ids)


def _draw_layers(data: pd.DataFrame, labels: dict[str, str]) -> Figure:
    runs = list(labels)
    layers = int(data.layer.max()) + 1
    fig = Figure(figsize=(min(14.0, 5.0 + 0.2 * layers * len(runs)), 4.0), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(runs)
    for k, (run_id, colour) in enumerate(zip(runs, _colours(len(runs)), strict=True)):
        rows = data[data.run_id == run_id]
        offset = (k - (len(runs) - 1) / 2) * width
        ax.bar(rows.layer + offset, rows.independent_decisions, width=width, color=colour,
               label=labels[run_id])
    ax.set_xlabel("layer")
    ax.set_ylabel("decisions spent independent")
    ax.set_title("How often each layer owned its weights")
    if layers <= 48:
        ax.set_xticks(range(layers))
    ax.legend(fontsize="small")
    return fig


# --- memory and parameters over steps -----------------------------------------------------------------------


def _load_memory(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    """Memory rows, each marked when its logging interval held a validation (and the checkpoint written with
    it): the peak of such an interval includes the evaluation's batches, not only training steps."""
    rows = query_rows(con, "memory-rows", ids)
    validated = query_rows(con, "validation-steps", ids)
    rows["after_validation"] = False
    for run_id, run_rows in rows.groupby("run_id"):
        steps = run_rows.step.to_numpy()
        starts = np.concatenate(([-1], steps[:-1]))
        evals = validated[validated.run_id == run_id].step.to_numpy()
        # an evaluation at step v runs after the reading at v, so it shows in the reading that follows
        hit = [bool(((evals >= lo) & (evals < hi)).any()) for lo, hi in zip(starts, steps, strict=True)]
        rows.loc[run_rows.index, "after_validation"] = hit
    return rows


def _draw_memory(data: pd.DataFrame, labels: dict[str, str]) -> Figure:
    fig = Figure(figsize=(8.0, 6.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    panels = ((top, "peak_bytes", "peak memory per logging interval"),
              (bottom, "training_state_bytes", "parameters + gradients + optimizer state"))
    for ax, column, title in panels:
        _byte_lines(ax, data, column, labels, mark_validation=column == "peak_bytes")
        ax.set_title(title)
    bottom.set_xlabel("step")
    return fig


def _byte_lines(ax: Axes, data: pd.DataFrame, column: str, labels: dict[str, str], *,
                mark_validation: bool = False) -> None:
    values = data[column].astype(float)
    largest = values.max()
    divisor, unit = _byte_scale(0.0 if math.isnan(largest) else largest)
    marked = False
    for run_id, colour in zip(labels, _colours(len(labels)), strict=True):
        rows = data[(data.run_id == run_id) & data[column].notna()]
        ax.plot(rows.step, rows[column].astype(float) / divisor, marker=".", color=colour,
                label=labels[run_id])
        if mark_validation:
            spikes = rows[rows.after_validation.astype(bool)]
            ax.scatter(spikes.step, spikes[column].astype(float) / divisor, marker="^", s=60,
                       facecolors="none", edgecolors=colour, zorder=3)
            marked = marked or not spikes.empty
    # from zero: a flat line must not look like growth because the axis starts just below it
    ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], 1e-9))
    ax.set_ylabel(unit)
    handles, texts = ax.get_legend_handles_labels()
    if marked:
        handles.append(Line2D([], [], marker="^", linestyle="none", markerfacecolor="none",
                              markeredgecolor="black", markersize=8))
        texts.append("interval with a validation (and its checkpoint)")
    ax.legend(handles, texts, fontsize="small", loc="lower right")


def _load_params(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    return query_rows(con, "param-rows", ids)


def _draw_params(data: pd.DataFrame, labels: dict[str, str]) -> Figure:
    fig = Figure(figsize=(8.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for run_id, colour in zip(labels, _colours(len(labels)), strict=True):
        rows = data[data.run_id == run_id]
        ax.plot(rows.step, rows.trainable_params, drawstyle="steps-post", marker=".", color=colour,
                label=labels[run_id])
        conventional = rows.conventional.dropna()
        if not conventional.empty:
            # What the same model trains with every block independent: the baseline tying is measured against.
            ax.axhline(float(conventional.iloc[0]), color=colour, linestyle=":", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("trainable parameters")
    ax.set_title("Trainable parameters (dotted: all blocks independent)")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.legend(fontsize="small")
    return fig


# --- metrics: validation curves -----------------------------------------------------------------------------


def _load_metrics(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    frame = query_rows(con, "evaluation-rows", ids)
    recorded = query_rows(con, "headline-metrics", ids)
    headline = dict(zip(recorded.run_id, recorded.metric, strict=True))
    keep = frame.name == frame.run_id.map(headline)
    # A run with only a final test row has no curve: it counts as having nothing to plot.
    has_curve = frame.run_id.isin(frame[keep & (frame.split == "validation")].run_id)
    return frame[keep & has_curve]


def _draw_metrics(data: pd.DataFrame, labels: dict[str, str]) -> Figure:
    # one panel per metric, in the order of the runs that recorded it
    metric_of = dict(zip(data.run_id, data.name, strict=True))
    names = list(dict.fromkeys(metric_of[run_id] for run_id in labels if run_id in metric_of))
    fig = Figure(figsize=(8.0, 4.0 * len(names)), layout="constrained")
    axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    colours = dict(zip(labels, _colours(len(labels)), strict=True))
    for ax, name in zip(axes, names, strict=True):
        for run_id, label in labels.items():
            _metric_curve(ax, data[(data.run_id == run_id) & (data.name == name)], colours[run_id], label)
        if name in _LOG_SCALE_METRICS and _spans_decades(data[data.name == name].value):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(f"validation {name} (star: final test)")
        ax.legend(fontsize="small")
    return fig


def _spans_decades(values: pd.Series) -> bool:
    """Log scale only pays off when the curve covers more than a factor of ten."""
    low, high = float(values.min()), float(values.max())
    return low > 0 and high / low > 10


def _metric_curve(ax: Axes, rows: pd.DataFrame, colour, label: str) -> None:
    if rows.empty:
        return
    validation = rows[rows.split == "validation"]
    ax.plot(validation.step, validation.value, marker=".", color=colour, label=label)
    test = rows[rows.split == "test"]
    if not test.empty:
        ax.scatter(test.step, test.value, marker="*", s=120, color=colour, edgecolors="black", zorder=3)


# --- study: validation curves per variant, over seeds ---------------------------------------------------------


def _load_study(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    from ..results.study import study_metric

    frame = query_rows(con, "study-curves", ids)
    metric, _ = study_metric(frame)
    return frame[frame.name == metric]


def _draw_study(data: pd.DataFrame, labels: dict[str, str]) -> Figure:
    from ..results.study import study_variant_order

    fig = Figure(figsize=(8.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    name = str(data.name.iloc[0])
    variants = sorted(dict.fromkeys(data.variant), key=study_variant_order)
    for variant, colour in zip(variants, _colours(len(variants)), strict=True):
        rows = data[data.variant == variant]
        by_step = rows.groupby("step").value
        mean, low, high = by_step.mean(), by_step.min(), by_step.max()
        seeds = rows.seed.nunique()
        ax.plot(mean.index, mean.values, marker=".", color=colour, label=f"{variant} ({seeds} seeds)")
        ax.fill_between(mean.index, low.values, high.values, color=colour, alpha=0.15, linewidth=0)
    if name in _LOG_SCALE_METRICS and _spans_decades(data.value):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"validation {name}")
    studies = ", ".join(dict.fromkeys(data.study))
    ax.set_title(f"study {studies}: mean over seeds (band: lowest to highest seed)")
    ax.legend(fontsize="small")
    return fig


PLOTS: dict[str, PlotKind] = {
    "ties": PlotKind(_load_ties, _draw_ties, "tie states (ties table)"),
    "layers": PlotKind(_load_layers, _draw_layers, "tie states (ties table)"),
    "memory": PlotKind(_load_memory, _draw_memory, "memory rows (memory table)"),
    "params": PlotKind(_load_params, _draw_params, "trainable-parameter rows (memory table)"),
    "metrics": PlotKind(_load_metrics, _draw_metrics, "validation metrics (metrics table)"),
    "study": PlotKind(_load_study, _draw_study, "finished run with validation rows in the study", every_run=False),
}
KINDS = tuple(PLOTS)
