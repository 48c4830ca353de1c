"""privacy_utility.png's layout (issue 21 item 5) on synthetic bench rows, no federation:
asserts on the matplotlib Figure/Axes, not on pixels."""

from __future__ import annotations

import math

import matplotlib
import pytest

from fl_sim.bench.privacy_plot import EXACT_LABEL, NO_DP, plot_privacy_utility, privacy_figure

matplotlib.use("Agg")

AXES = ("defenses.0.name", "defenses.0.params.noise_multiplier")
#: σ -> ε of a synthetic DP sweep (σ = 0: no noise, ε = ∞)
EPS = {0.0: "inf", 0.1: 950.0, 1.0: 6.3, 4.0: 0.41}


def _rows() -> list[dict]:
    """2 defenses x 4 σ x 2 attacks. PSNR falls with σ; iDLG is exact (∞) without noise;
    accuracy falls with σ; IG has a random start at 9-10 dB."""
    rows = []
    for d in ("dp_sgd", "local_dp"):
        for i, (sigma, eps) in enumerate(EPS.items()):
            for att in ("inverting_gradients", "idlg"):
                exact = att == "idlg" and sigma == 0.0
                rows.append({
                    "key": f"{d}-{sigma}-{att}", "sim": f"{d}-{sigma}", "attack": att,
                    "view": "server", "axes": {AXES[0]: d, AXES[1]: sigma},
                    "defenses": [f"{d}(noise_multiplier={sigma})"],
                    "psnr": None if exact else 40.0 - 8 * i - (att == "idlg"),
                    "exact": ["psnr"] if exact else [],
                    "start_psnr": 9.0 + 0.1 * i if att == "inverting_gradients" else None,
                    "utility": 0.9 - 0.1 * i - (d == "local_dp") * 0.05,
                    "utility_metric": "eval_accuracy", "epsilon": eps, "error": None})
    return rows


@pytest.fixture
def fig():
    f = privacy_figure(_rows(), AXES)
    yield f
    import matplotlib.pyplot as plt
    plt.close(f)


def test_dp_sweep_is_drawn_against_log_epsilon_with_no_dp_apart(fig):
    psnr, util = fig.axes[:2]  # legends are not axes: exactly one panel per quantity
    assert len(fig.axes) == 2
    assert psnr.get_shared_x_axes().joined(psnr, util)  # separate panels, one x
    assert util.get_xscale() == "log"
    labels = [t.get_text() for t in util.get_xticklabels()]
    ticks = list(util.get_xticks())
    assert labels[-1] == NO_DP and labels.count(NO_DP) == 1
    finite = [float(e) for e in EPS.values() if e != "inf"]
    assert ticks[-1] > 2 * max(finite)  # the no-DP column lies right of every finite ε
    # each series' points lie at the cells' ε (log axis), the no-DP cell at the no-DP tick
    # (its labelled line up to the largest ε, a dotted unlabelled step across the break)
    for ax in (psnr, util):
        labelled = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
        assert labelled
        for ln in labelled:
            assert sorted(ln.get_xdata()) == pytest.approx(sorted(finite))
        steps = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"
                 and len(ln.get_xdata()) == 2 and ln.get_xdata()[1] == ticks[-1]]
        assert len(steps) == len(labelled)
        assert all(ln.get_xdata()[0] == max(finite) for ln in steps)
    # the break before the no-DP column: a vertical line between max ε and the no-DP tick
    vlines = [ln for ln in psnr.get_lines() if len(set(ln.get_xdata())) == 1
              and len(ln.get_xdata()) == 2]
    assert any(max(finite) < ln.get_xdata()[0] < ticks[-1] for ln in vlines)


def test_one_line_per_series_legend_instead_of_annotations(fig):
    psnr, util = fig.axes
    series = [ln.get_label() for ln in psnr.get_lines() if not ln.get_label().startswith("_")]
    # 2 defenses x 2 attacks; σ is x, not a series
    assert sorted(series) == sorted(f"{d} · {a} (server)" for d in ("dp_sgd", "local_dp")
                                    for a in ("inverting_gradients", "idlg"))
    assert sorted(ln.get_label() for ln in util.get_lines()
                  if not ln.get_label().startswith("_")) == ["dp_sgd", "local_dp"]
    for ax in fig.axes:
        assert len(ax.texts) == 0  # no per-point annotation anywhere
        assert ax.get_legend() is not None


def test_exact_reconstructions_are_drawn_and_start_floor_is_a_band(fig):
    psnr = fig.axes[0]
    handles, labels = psnr.get_legend_handles_labels()
    assert EXACT_LABEL in labels
    exact = handles[labels.index(EXACT_LABEL)]
    ys = exact.get_offsets()[:, 1]
    assert len(ys) == 1 and ys[0] > 40.0  # above every finite PSNR (max 40 dB)
    bands = [p for p in psnr.patches if "random start" in p.get_label()]
    assert len(bands) == 2  # IG's start per defense; iDLG has none
    for b in bands:  # the band covers the start values 9.0-9.3 dB
        y0, y1 = b.get_y(), b.get_y() + b.get_height()
        assert y0 <= 9.0 and y1 >= 9.3 and y1 - y0 < 2.0


def test_grid_without_epsilon_uses_tick_labels_not_annotations(tmp_path):
    rows = [{"key": f"p{r}", "sim": f"p{r}", "attack": "idlg", "view": "server",
             "axes": {"defenses.0.params.ratio": r}, "defenses": [f"pruning(ratio={r})"],
             "psnr": 30.0 - 10 * r, "exact": [], "utility": 0.8 - 0.1 * r,
             "utility_metric": "eval_accuracy", "epsilon": None, "error": None}
            for r in (0.1, 0.5, 0.9)]
    f = privacy_figure(rows, ["defenses.0.params.ratio"])
    try:
        assert len(f.axes) == 2 and all(len(ax.texts) == 0 for ax in f.axes)
        assert f.axes[1].get_xscale() == "linear"
        assert [t.get_text() for t in f.axes[1].get_xticklabels()] == [
            "ratio=0.1", "ratio=0.5", "ratio=0.9"]
    finally:
        import matplotlib.pyplot as plt
        plt.close(f)
    out = plot_privacy_utility(rows, ["defenses.0.params.ratio"], tmp_path / "p.png")
    assert out is not None and out.stat().st_size > 0
    assert not math.isnan(out.stat().st_size)
