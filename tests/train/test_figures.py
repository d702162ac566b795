"""Run figures drawn with matplotlib (Agg, no display): files, layout, axes, legends and line styles."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

from proxim.figures import DPI, Panel, Series, build_figure, figure_pixels, informative, smoothing_window, write_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAN, INF = float("nan"), float("inf")


def _ramp(n: int, start: float = 0.5, end: float = 0.86) -> list[tuple[float, float]]:
    return [(float(i), start + (end - start) * i / max(1, n - 1)) for i in range(1, n + 1)]


def _run_panels(n: int = 400) -> list[Panel]:
    accuracy = _ramp(n)
    return [
        Panel("reward", "reward (0-1)", [Series("reward/mean", accuracy), Series("reward/accuracy", accuracy)]),
        Panel("accuracy", "accuracy", [Series("train", accuracy), Series("held-out", accuracy[19::20], style="dashed")], percent=True),
        Panel("KL to reference", "nats / token", [Series("kl/ref", [(x, 0.03 * x / n) for x, _ in accuracy])]),
    ]


def _labelled_lines(ax: Axes) -> list[Line2D]:
    """The lines of the series (not the faint raw lines, whose labels start with an underscore)."""
    return [line for line in ax.get_lines() if not str(line.get_label()).startswith("_")]


def _ys(line: Line2D) -> list[float]:
    return [float(v) for v in np.asarray(line.get_ydata(), dtype=float)]


def _xs(line: Line2D) -> list[float]:
    return [float(v) for v in np.asarray(line.get_xdata(), dtype=float)]


def _drawn(fig: Figure) -> Figure:
    fig.canvas.draw()  # tick labels and the legend's place are computed on draw
    return fig


# -- files -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_panels", [1, 3, 4, 7])
def test_png_has_the_signature_and_the_size_of_its_figure(tmp_path: Path, n_panels: int) -> None:
    panels = [Panel(f"panel {i}", "value", [Series("a", _ramp(50, 0, i + 1.0))]) for i in range(n_panels)]
    path = write_figure(tmp_path / "plot.png", panels, title="a run")
    assert path == tmp_path / "plot.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == figure_pixels(n_panels)
        assert image.size[0] == 990 == 9 * DPI  # 9 inches at 110 dpi
        assert image.size[1] >= 250 * math.ceil(n_panels / (2 if n_panels >= 4 else 1))  # room for every row


def test_write_is_atomic_and_replaces_the_previous_image(tmp_path: Path) -> None:
    path = tmp_path / "plot.png"
    path.write_bytes(b"an older plot")
    write_figure(path, _run_panels(), title="run")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]  # no temporary file left behind
    assert os.stat(path).st_mode & 0o044  # readable by others, like any file the run writes (not mkstemp's 0600)


def test_write_creates_the_folder_and_accepts_a_string_path(tmp_path: Path) -> None:
    path = write_figure(str(tmp_path / "runs" / "a" / "plot.png"), _run_panels(), title="run")
    assert path is not None and path.is_file()


def test_no_panel_writes_nothing_and_returns_none(tmp_path: Path) -> None:
    assert write_figure(tmp_path / "plot.png", [], title="run") is None
    assert write_figure(tmp_path / "plot.png", informative([Panel("clip", "fraction", [Series("clip", [(1, 0.0), (2, 0.0)])])]), title="run") is None
    assert not (tmp_path / "plot.png").exists()
    with pytest.raises(ValueError, match="at least one panel"):
        build_figure([], "run", "step")


# -- informative ----------------------------------------------------------------------------------------


def test_informative_drops_exactly_the_series_zero_or_without_finite_points() -> None:
    panels = [
        Panel("reward", "reward", [Series("mean", [(1, 0.5), (2, 0.6)]), Series("accuracy", [(1, 0.5), (2, 0.6)])]),
        Panel("clip fractions", "fraction", [Series("high", [(s, 0.0) for s in range(400)]), Series("low", [(s, -0.0) for s in range(400)])], percent=True),
        Panel("kl", "nats / token", [Series("kl/ref", [(1, 0.0), (2, 0.01)]), Series("region/approx_kl", [(1, 0.0), (2, 0.0), (3, NAN)])]),
        Panel("broken", "x", [Series("nan", [(1, NAN), (2, INF)]), Series("none", [])]),
        Panel("coefficient", "kl coef", [Series("kl/coef", [(1, 0.05), (2, 0.05)])]),
        Panel("empty", "x", []),
    ]
    kept = informative(panels)
    assert [(p.title, [s.label for s in p.series]) for p in kept] == [
        ("reward", ["mean", "accuracy"]),  # identical series are both kept
        ("kl", ["kl/ref"]),  # zero at step 1 but not always
        ("coefficient", ["kl/coef"]),  # constant but not zero
    ]
    assert kept[1].ylabel == "nats / token" and kept[0] == panels[0]
    assert informative(kept) == kept


def test_informative_keeps_a_series_zero_except_at_one_finite_point() -> None:
    series = Series("clip/high", [(1, 0.0), (2, NAN), (3, 0.001), (4, 0.0)])
    assert informative([Panel("clip", "fraction", [series])]) == [Panel("clip", "fraction", [series])]


# -- axes, ticks, legends, lines -------------------------------------------------------------------


def test_identical_series_stay_distinguishable() -> None:
    fig = _drawn(build_figure(_run_panels(), "grpo", "step"))
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == ["reward/mean", "reward/accuracy"]
    mean, accuracy = _labelled_lines(ax)
    assert _ys(mean) == _ys(accuracy)
    assert mean.get_color() != accuracy.get_color()
    assert mean.get_linestyle() != accuracy.get_linestyle()
    assert mean.get_marker() != accuracy.get_marker()
    assert mean.get_linewidth() > accuracy.get_linewidth()  # the one below shows around the one on top
    assert mean.get_zorder() < accuracy.get_zorder()
    assert mean.get_markevery() != accuracy.get_markevery()  # staggered markers


def test_axes_have_titles_labels_several_ticks_and_a_grid() -> None:
    fig = _drawn(build_figure(_run_panels(), "grpo on arithmetic", "step"))
    assert fig.get_suptitle() == "grpo on arithmetic"
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["reward", "accuracy", "KL to reference"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["reward (0-1)", "accuracy", "nats / token"]
    assert [ax.get_xlabel() for ax in fig.axes] == ["", "", "step"]  # shared x axis, labelled at the bottom
    for ax in fig.axes:
        assert len([t for t in ax.get_yticklabels() if t.get_text()]) >= 4  # not only min and max
        assert ax.get_ygridlines() and all(line.get_visible() for line in ax.get_xgridlines() + ax.get_ygridlines())
    bottom = fig.axes[-1]
    xticks = [t.get_text() for t in bottom.get_xticklabels() if t.get_text()]
    assert len(xticks) >= 4 and all(t.lstrip("−-").isdigit() for t in xticks)  # integer steps


def test_single_series_panel_is_labelled_without_a_legend() -> None:
    fig = build_figure(_run_panels(), "grpo", "step")
    kl = fig.axes[2]
    assert kl.get_legend() is None
    assert kl.get_title(loc="right") == "kl/ref"


def test_percent_panel_formats_ticks_as_percentages_within_0_and_100() -> None:
    fig = _drawn(build_figure(_run_panels(), "grpo", "step"))
    labels = [t.get_text() for t in fig.axes[1].get_yticklabels() if t.get_text()]
    assert labels and all(label.endswith("%") for label in labels)
    values = [float(label.rstrip("%").replace("−", "-")) for label in labels]
    assert 0 <= min(values) and max(values) <= 100
    assert len(set(labels)) == len(labels)
    tight = Panel("accuracy", "accuracy", [Series("a", [(1, 0.991), (2, 0.9935), (3, 0.994)])], percent=True)
    tight_labels = [t.get_text() for t in _drawn(build_figure([tight], "t", "step")).axes[0].get_yticklabels() if t.get_text()]
    assert len(set(tight_labels)) == len(tight_labels) >= 3  # decimals enough to tell the ticks apart
    assert "-" not in "".join(tight_labels) and "−" not in "".join(tight_labels)


def test_held_out_series_is_dashed_with_a_marker_on_each_point() -> None:
    fig = build_figure(_run_panels(), "grpo", "step")
    _, held_out = _labelled_lines(fig.axes[1])
    assert held_out.get_linestyle() == "--"
    assert held_out.get_marker() not in ("", "none", "None")
    assert held_out.get_markevery() == 1
    assert len(_xs(held_out)) == 20


def test_non_finite_points_are_skipped() -> None:
    points = [(1, 0.5), (2, NAN), (3, INF), (NAN, 0.7), (4, -INF), (5, 0.6)]
    fig = _drawn(build_figure([Panel("reward", "reward", [Series("mean", points)])], "run", "step"))
    (line,) = _labelled_lines(fig.axes[0])
    assert _xs(line) == [1.0, 5.0] and _ys(line) == [0.5, 0.6]
    low, high = fig.axes[0].get_ylim()
    assert math.isfinite(low) and math.isfinite(high) and low < 0.5 and high > 0.6


def test_one_point_is_a_marker_and_a_panel_without_points_says_no_data(tmp_path: Path) -> None:
    panels = [Panel("one", "x", [Series("a", [(3, 0.5)])]), Panel("none", "y", [Series("b", [(1, NAN)])]), Panel("empty", "z", [])]
    fig = _drawn(build_figure(panels, "edge cases", "step"))
    (line,) = _labelled_lines(fig.axes[0])
    assert line.get_marker() not in ("", "none", "None")
    for ax in fig.axes[1:]:
        assert [t.get_text() for t in ax.texts] == ["no data"]
    assert write_figure(tmp_path / "edge.png", panels, title="edge cases") is not None


def test_log_panel_skips_points_that_are_not_positive() -> None:
    panel = Panel("loss", "loss", [Series("sft", [(1, 3.0), (2, 1.0), (3, 0.0), (4, -1.0), (5, 0.1)])], log=True)
    ax = _drawn(build_figure([panel], "sft", "step")).axes[0]
    assert ax.get_yscale() == "log"
    (line,) = _labelled_lines(ax)
    assert _ys(line) == [3.0, 1.0, 0.1]
    labels = [t.get_text() for t in ax.get_yticklabels() + ax.get_yticklabels(minor=True) if t.get_text()]
    assert "1" in labels and all(float(label) > 0 for label in labels)  # plain numbers, not 10^0 or 3x10^-1


def test_long_series_are_smoothed_over_their_faint_raw_points() -> None:
    noisy = [(float(i), 0.5 + (0.1 if i % 2 else -0.1)) for i in range(1, 401)]
    panel = Panel("reward", "reward", [Series("mean", noisy)])
    ax = build_figure([panel], "run", "step").axes[0]
    raw = [line for line in ax.get_lines() if line.get_label() == "_raw mean"]
    (smoothed,) = _labelled_lines(ax)
    alpha = raw[0].get_alpha() if len(raw) == 1 else None
    assert alpha is not None and alpha < 0.5
    assert _ys(raw[0]) == [y for _, y in noisy]
    assert max(_ys(smoothed)) - min(_ys(smoothed)) < 0.05
    assert smoothing_window(400) == 11 and smoothing_window(20) == 1
    (unsmoothed,) = build_figure([panel], "run", "step", smooth=False).axes[0].get_lines()
    assert _ys(unsmoothed) == [y for _, y in noisy]


def test_many_panels_are_laid_out_on_two_columns() -> None:
    panels = [Panel(f"p{i}", "value", [Series("a", _ramp(30, 0, i + 1.0))]) for i in range(5)]
    fig = build_figure(panels, "run", "step")
    columns = {round(ax.get_position().x0, 2) for ax in fig.axes[:4]}
    assert len(columns) == 2
    assert fig.axes[4].get_position().width > 1.5 * fig.axes[0].get_position().width  # the odd last panel spans both
    assert [ax.get_xlabel() for ax in fig.axes] == ["", "", "", "", "step"]
    assert figure_pixels(5) == (990, 60 + 3 * 286)


def test_compare_figure_has_one_legend_entry_per_run() -> None:
    runs = ["grpo", "rloo", "drpo", "dppo", "reinforce_pp"]
    reward = Panel("train reward", "mean reward", [Series(r, _ramp(400, 0.5, 0.8 + 0.01 * k)) for k, r in enumerate(runs)])
    kl = Panel("KL to reference", "nats / token", [Series(r, _ramp(400, 0.0, 0.01 * (k + 1))) for k, r in enumerate(runs)])
    fig = build_figure([reward, kl], "compare", "step")
    for ax in fig.axes:
        legend = ax.get_legend()
        assert legend is not None and [t.get_text() for t in legend.get_texts()] == runs
        lines = _labelled_lines(ax)
        assert len({line.get_color() for line in lines}) == len(runs)


# -- imports ----------------------------------------------------------------------------------------


def test_importing_is_light_and_drawing_does_not_use_pyplot(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "import proxim.figures as f\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'\n"
        f"f.write_figure({str(tmp_path / 'plot.png')!r}, [f.Panel('r', 'reward', [f.Series('mean', [(1, 0.5), (2, 0.6)])])], title='run')\n"
        "assert 'matplotlib' in sys.modules\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert (tmp_path / "plot.png").read_bytes()[:8] == PNG_SIGNATURE


def test_missing_matplotlib_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'proxim\[train\]'"):
        build_figure(_run_panels(), "run", "step")
