"""Run figures as PNG files, drawn with matplotlib: one subplot per `Panel`, one line per `Series`.

    from proxim.figures import Panel, Series, informative, write_figure

    panels = [
        Panel("reward", "mean reward", [Series("reward/mean", points)]),
        Panel("accuracy", "accuracy", [Series("train", train), Series("held-out", held_out, style="dashed")], percent=True),
    ]
    write_figure(run_dir / "plot.png", informative(panels), title="grpo on arithmetic")

The module knows nothing about recipes or metric keys: callers build the panels from their metrics.
matplotlib is imported only by the functions that draw (`build_figure`, `write_figure`), so importing
this module stays cheap; it is part of the ``train`` extra (``pip install 'proxim[train]'``). Drawing
uses a `matplotlib.figure.Figure` and the Agg canvas directly: no pyplot, no global state and no display,
so it is safe in a library, in worker processes and under tests.

Readability choices, each fixing what the earlier hand-drawn charts got wrong:

* every axis has ticks (five to eight, integers on the step axis, no "+1e5" offsets) and a label with
  units; a percent panel shows ``50%`` rather than ``0.5``, a log panel ``0.6`` rather than 6x10^-1;
* long series (60 points or more) are drawn as a centred moving average over their faint raw points,
  and a note under the figure gives the window: per-step RL metrics are noisy, the trend is the point;
* series of a panel differ in colour (a colour-blind safe palette) *and* in line style and markers, and
  later series are drawn thinner on top of earlier ones, so two series with identical values (reward and
  accuracy of a 0/1-rewarded task) both stay visible;
* non-finite points are skipped (a NaN step leaves no hole in the axes' limits), a one-point series is
  drawn as a marker, a panel without any finite point says "no data";
* `informative` drops the series that are zero for the whole run, so no panel is flat at zero.

Up to three panels are stacked, more go on two columns; the PNG is 990 pixels wide (9 inches at 110
dpi). `write_figure` of no panel at all writes nothing and returns None.
"""

from __future__ import annotations

import itertools
import math
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.ticker import Formatter, LogFormatter

__all__ = ["DPI", "WIDTH_INCHES", "Panel", "Series", "Style", "build_figure", "figure_pixels", "informative", "smoothing_window", "write_figure"]

Style = Literal["auto", "solid", "dashed", "dotted", "points"]
"""How a series is drawn: ``auto`` takes the next line style of the panel; ``dashed`` (with a marker on
each point) suits held-out evaluations made every few steps; ``points`` draws markers only."""

DPI = 110
WIDTH_INCHES = 9.0
TWO_COLUMNS_FROM = 4
"""Four panels or more are laid out on a grid of two columns, fewer are stacked."""

# Okabe & Ito's colour-blind safe palette (without its yellow, too light on white), then greys.
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#7F7F7F")
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_MARKERS_ON_EVERY_POINT = 40  # series with at most this many points get a marker on each of them
_MARKERS_PER_LINE = 8  # denser series get this many markers, staggered between series
SMOOTH_FROM = 60
"""Series with at least this many points are smoothed (`smoothing_window`)."""
_STYLE_LINES = {"solid": "-", "dashed": "--", "dotted": ":", "points": "none"}
_ROW_PIXELS = {1: 275, 2: 286}  # height of one row of panels (2.5 and 2.6 inches), by number of columns
_HEADER_PIXELS = 60  # room for the figure title and the note under the figure


def _points(values: Iterable[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    return tuple((float(x), float(y)) for x, y in values)


def _series(values: Iterable[Series]) -> tuple[Series, ...]:
    return tuple(values)


@attrs.frozen
class Series:
    """One curve: a legend label, its ``(x, y)`` points (non-finite ones are skipped when drawn) and a style.

    `points` takes any iterable of pairs (a list, a generator) and is stored as a tuple of float pairs.
    `style` is a hint (see `Style`): ``"dashed"`` for held-out evaluations, ``"auto"`` otherwise.
    """

    label: str
    points: tuple[tuple[float, float], ...] = attrs.field(converter=_points)
    style: Style = "auto"

    def finite(self) -> list[tuple[float, float]]:
        """The points whose both coordinates are finite, in their order."""
        return [(x, y) for x, y in self.points if math.isfinite(x) and math.isfinite(y)]


@attrs.frozen
class Panel:
    """One subplot: a title, the y-axis label (with units: ``"tokens"``, ``"nats / token"``) and its series.

    ``percent=True`` shows values in [0, 1] as percentages (accuracies, fractions); ``log=True`` draws
    the y axis on a log scale (points <= 0 are then skipped). ``essential=True``: a series at zero is
    still news here (a reward or an accuracy that stays at 0), so `informative` keeps it.
    """

    title: str
    ylabel: str
    series: tuple[Series, ...] = attrs.field(converter=_series)
    percent: bool = False
    log: bool = False
    essential: bool = False


def informative(panels: Iterable[Panel]) -> list[Panel]:
    """The panels without their uninformative series, and without the panels left empty.

    A series is dropped when it has no finite point, or when all its finite points are exactly zero:
    a clip fraction of an on-policy run (one update per batch, so the ratio is 1 and nothing is
    clipped) or a KL term of a run without a reference is zero at every step, and a panel flat at zero
    for 400 steps tells the reader nothing while taking the room of a useful one. A series constant at
    a non-zero value is kept (a fixed KL coefficient is worth seeing), and so is a series at zero in an
    `essential` panel (a reward that never rises). Panel order is kept.
    """
    kept: list[Panel] = []
    for panel in panels:
        series = [s for s in panel.series if s.finite() and (panel.essential or any(y != 0.0 for _, y in s.finite()))]
        if series:
            kept.append(attrs.evolve(panel, series=series))
    return kept


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:  # pragma: no cover - matplotlib is installed with the train extra
        raise ImportError("drawing run figures needs matplotlib: pip install 'proxim[train]' (or pip install matplotlib)") from exc


def _layout(n: int) -> tuple[int, int]:
    """(rows, columns) for `n` panels."""
    columns = 2 if n >= TWO_COLUMNS_FROM else 1
    return -(-n // columns), columns


def figure_pixels(n: int) -> tuple[int, int]:
    """The (width, height) in pixels of the PNG of a figure of `n` panels: 990 wide, a row of panels 275
    (stacked) or 286 (two columns) high, and 60 for the title and the note."""
    rows, columns = _layout(n)
    return round(WIDTH_INCHES * DPI), _HEADER_PIXELS + rows * _ROW_PIXELS[columns]


def _figure_inches(n: int) -> tuple[float, float]:
    # A quarter pixel more: Agg truncates inches * dpi, and 913 / 110 * 110 is 912.99999...
    width, height = figure_pixels(n)
    return (width + 0.25) / DPI, (height + 0.25) / DPI


def smoothing_window(n: int) -> int:
    """The moving-average window (an odd number of points) for a series of `n` points; 1: not smoothed.

    Series of `SMOOTH_FROM` points or more are smoothed over about 2.5% of their length (at least 5
    points): per-step metrics of RL runs are noisy (a batch of 64 0/1 rewards has a standard deviation
    of about 0.06), and the trend is what a reader looks for; the raw points stay drawn, faint, below.
    """
    if n < SMOOTH_FROM:
        return 1
    return max(5, round(n / 40)) | 1


def _moving_average(ys: Sequence[float], window: int) -> list[float]:
    """The centred moving average of `ys` over `window` points, over fewer near the ends (no lag, no edge drop)."""
    import numpy as np

    half = window // 2
    sums = np.concatenate(([0.0], np.cumsum(np.asarray(ys, dtype=np.float64))))
    index = np.arange(len(ys))
    lo, hi = np.maximum(index - half, 0), np.minimum(index + half + 1, len(ys))
    return [float(v) for v in (sums[hi] - sums[lo]) / (hi - lo)]


def _percent_decimals(step: float) -> int:
    """The fewest decimals (up to 4) that write multiples of `step` (in percent) exactly: 10 -> 0, 2.5 -> 1, 0.05 -> 2."""
    for decimals in range(5):
        scaled = step * 10**decimals
        if abs(scaled - round(scaled)) < 1e-6 * max(1.0, scaled):
            return decimals
    return 4


def _percent_formatter() -> Formatter:
    """Fractions as percentages, with the decimals the tick spacing needs (``40%``, ``99.25%``), no more."""
    from matplotlib.ticker import Formatter

    class Percent(Formatter):
        decimals = 0

        def set_locs(self, locs: list[float]) -> None:
            ticks = sorted(float(v) for v in locs)
            self.decimals = _percent_decimals(min((b - a for a, b in itertools.pairwise(ticks) if b > a), default=0.1) * 100)
            super().set_locs(locs)

        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x * 100:.{self.decimals}f}%"

    return Percent()


def _plain_log_formatter(choose: LogFormatter) -> Formatter:
    """The ticks `choose` labels, written plainly (``0.6``, ``3``, ``1e-05``) rather than as ``6x10^-1``."""
    from matplotlib.ticker import Formatter

    class PlainLog(Formatter):
        def set_axis(self, axis: Any) -> None:
            choose.set_axis(axis)
            super().set_axis(axis)

        def set_locs(self, locs: list[float]) -> None:
            choose.set_locs(locs)
            super().set_locs(locs)

        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:.3g}" if choose(x, pos) else ""

    return PlainLog()


def _draw_panel(ax: Axes, panel: Panel, smooth: bool) -> int:
    """Draw `panel` on `ax`; returns the largest smoothing window used (1: none)."""
    from matplotlib.ticker import LogFormatter, MaxNLocator, ScalarFormatter

    ax.set_title(panel.title, loc="left", fontsize=11, fontweight="bold")
    ax.set_ylabel(panel.ylabel, fontsize=9.5)
    ax.grid(True, color="#b0b0b0", alpha=0.45, linewidth=0.6)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 2.5, 5, 10], integer=True, min_n_ticks=3))
    drawable = [(k, s, [(x, y) for x, y in s.finite() if y > 0 or not panel.log]) for k, s in enumerate(panel.series)]
    drawable = [(k, s, points) for k, s, points in drawable if points]
    many = len(drawable) > 1
    used = 1
    finite_ys: list[float] = []
    for k, series, points in drawable:
        xs, ys = [x for x, _ in points], [y for _, y in points]
        finite_ys += ys
        color = COLORS[k % len(COLORS)]
        linestyle = _STYLE_LINES.get(series.style, LINESTYLES[k % len(LINESTYLES)])
        window = smoothing_window(len(points)) if smooth and series.style != "points" and min(ys) != max(ys) else 1
        if window > 1:
            used = max(used, window)
            ax.plot(
                xs, ys, label=f"_raw {series.label}", color=color, linewidth=0.7, alpha=0.4 if not many else 0.28 if len(drawable) <= 2 else 0.18, zorder=1.5
            )
            ys = _moving_average(ys, window)
        marker: str = "none"
        markevery: int | tuple[int, int] = 1
        if len(points) <= _MARKERS_ON_EVERY_POINT or series.style == "points":
            marker = MARKERS[k % len(MARKERS)]
        elif many:  # markers tell dense lines apart in the legend and where they overlap, staggered between series
            step = max(1, len(points) // _MARKERS_PER_LINE)
            marker, markevery = MARKERS[k % len(MARKERS)], ((k * step) // len(drawable) % step, step)
        # Earlier series drawn wider, below the later ones: a later line on top of an identical earlier
        # one leaves the earlier visible on both sides, and in the gaps of its dashes.
        width = max(1.2, 2.2 - 0.35 * k) if many else 1.7
        ax.plot(
            xs,
            ys,
            label=series.label,
            color=color,
            linestyle=linestyle,
            linewidth=width,
            marker=marker,
            markevery=markevery,
            markersize=5.0 if len(points) > 1 else 6.5,
            markerfacecolor="white" if k % 2 else color,
            markeredgecolor=color,
            markeredgewidth=1.1,
            zorder=2 + k,
        )
    if panel.log and drawable:
        ax.set_yscale("log")
        # "0.6" and "3" rather than 6x10^-1 and 3x10^0 (on axes spanning few decades, some minor ticks are labelled)
        ax.yaxis.set_major_formatter(_plain_log_formatter(LogFormatter(labelOnlyBase=False)))
        ax.yaxis.set_minor_formatter(_plain_log_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.2, 0.5))))
        ax.grid(True, which="minor", axis="y", color="#b0b0b0", alpha=0.25, linewidth=0.5)
    elif panel.percent:
        ax.yaxis.set_major_formatter(_percent_formatter())
        ax.yaxis.set_major_locator(MaxNLocator(nbins=7, steps=[1, 2, 2.5, 5, 10]))
        if finite_ys and min(finite_ys) >= 0 and max(finite_ys) <= 1:  # fractions: no tick beyond 0% or 100%
            low, high = ax.get_ylim()
            low, high = max(low, -0.02), min(high, 1.02)
            ax.set_yticks([t for t in ax.yaxis.get_major_locator().tick_values(low, high) if -1e-9 <= t <= 1 + 1e-9])
            ax.set_ylim(low, high)
    else:
        formatter = ScalarFormatter(useOffset=False)  # no "+1.2e5" offsets: tick labels read as they are
        formatter.set_powerlimits((-4, 6))  # plain from 0.0001 to 999999, a "1e-5" multiplier beyond
        ax.yaxis.set_major_formatter(formatter)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=7, steps=[1, 2, 2.5, 5, 10]))
    if finite_ys and not panel.log:
        low, high = min(finite_ys), max(finite_ys)
        centre = (low + high) / 2
        if 0 < high - low <= 1e-9 * abs(centre):  # float noise on a constant: show it flat, not zoomed in on the noise
            ax.set_ylim(centre - 0.05 * abs(centre), centre + 0.05 * abs(centre))
    if not drawable:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="#7f7f7f", fontsize=10)
        ax.set_yticks([])
    elif not many:
        ax.set_title(drawable[0][1].label, loc="right", fontsize=9, color="#555555")
    else:
        ax.legend(loc="best", fontsize=8.5, frameon=True, framealpha=0.85, edgecolor="#cccccc", handlelength=2.6, ncols=1 if len(drawable) <= 3 else 2)
    return used


def build_figure(panels: Sequence[Panel], title: str, xlabel: str = "step", *, smooth: bool = True) -> Figure:
    """The figure `write_figure` saves, for callers and tests that inspect it (axes, ticks, legends, lines).

    One subplot per panel, in order: stacked for up to three panels, row by row on two columns beyond
    (an odd last panel then spans both columns). The x axis is shared, labelled `xlabel` under the
    bottom panel of each column; tick labels are shown under the bottom row, and under the row above a
    wide last panel. With `smooth`,
    long series are drawn as a moving average over the faint raw points (`smoothing_window`), and a
    note under the figure says so. The lines carrying a series' `label` are the drawn curves; the
    faint raw lines are labelled ``"_raw <label>"`` (matplotlib keeps labels starting with ``_`` out
    of legends). Raises ValueError on an empty `panels` (there is nothing to draw).
    """
    if not panels:
        raise ValueError("a figure needs at least one panel (informative() may have dropped them all)")
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(panels)
    rows, columns = _layout(n)
    fig = Figure(figsize=_figure_inches(n), dpi=DPI, layout="constrained", facecolor="white")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, columns)
    first: Axes | None = None
    window = 1
    for i, panel in enumerate(panels):
        row, column = divmod(i, columns)
        wide = columns == 2 and i == n - 1 and n % 2 == 1  # an odd last panel spans the two columns
        ax = fig.add_subplot(grid[row, :] if wide else grid[row, column], sharex=first)
        first = first or ax
        window = max(window, _draw_panel(ax, panel, smooth))
        if row == rows - 1:  # the bottom panel of its column
            ax.set_xlabel(xlabel, fontsize=9.5)
        elif not (row == rows - 2 and columns == 2 and n % 2 == 1):  # above a wide panel, whose scale differs: keep the tick labels
            ax.tick_params(labelbottom=False)
    fig.align_ylabels()
    fig.suptitle(title, fontsize=13)
    if window > 1:
        fig.supxlabel(f"faint: every point; lines: centred moving average over {window} points", fontsize=8.5, color="#555555", x=0.99, ha="right")
    return fig


def write_figure(path: str | os.PathLike[str], panels: Sequence[Panel], *, title: str, xlabel: str = "step", smooth: bool = True) -> Path | None:
    """Write `panels` to the PNG `path` (see `build_figure`) and return its path.

    With no panel at all (as when `informative` dropped them all), nothing is written and None is
    returned: a run without plottable metrics is not an error, and an existing file at `path` is left
    as it is. The PNG is written to a temporary file in the same folder and moved into place, so a
    reader never sees a partial image. Its size in pixels is `figure_pixels(len(panels))`.
    """
    if not panels:
        return None
    path = Path(path)
    fig = build_figure(panels, title, xlabel, smooth=smooth)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its file is private (0600); open() gives the usual permissions (umask).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fig.savefig(fh, format="png", dpi=DPI, facecolor="white", metadata={"Title": title})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
