"""PNG plots of one or more runs, overlaid on shared axes (one colour per run).

Each plot function returns a Figure, or None when no run has the data it shows, so a plot
appears as soon as the metrics carry its keys. Figures draw on the Agg canvas directly: no
pyplot, no display, no global state.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedlora.report.runs import (
    ACCURACY,
    FAMILY_PREFIX,
    Run,
    accuracy_families,
    client_metrics,
    cumulative,
    series,
    step_loss_series,
    traffic_series,
    update_norms,
)
from fedlora.wire import M

MB = 1e6


def figure(panels: int = 1, width: float = 6.4) -> tuple[Figure, list]:
    """A figure with `panels` axes side by side, on the Agg canvas."""
    fig = Figure(figsize=(width * min(panels, 3), 4.2 * ((panels + 2) // 3)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots((panels + 2) // 3, min(panels, 3), squeeze=False).ravel().tolist()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def finish(ax, title: str, ylabel: str) -> None:
    """Title, labels, integer round ticks, grid and legend of one axes."""
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def lines(runs: list[Run], ax, key: str, style: str = "-o", suffix: str = "") -> bool:
    """Plot `key` of every run on `ax`; True when any run had a point."""
    drawn = False
    for i, run in enumerate(runs):
        rounds, values = series(run.rows, key)
        if rounds:
            ax.plot(rounds, values, style, color=f"C{i}", label=run.label + suffix, markersize=4)
            drawn = True
    return drawn


def plot_loss(runs: list[Run]) -> Figure | None:
    """Train loss (solid) and eval loss (dashed) per round."""
    fig, (ax,) = figure()
    drawn = lines(runs, ax, M.TRAIN_LOSS, "-o", " train")
    drawn = lines(runs, ax, M.EVAL_LOSS, "--s", " eval") or drawn
    finish(ax, "loss per round", "loss")
    return fig if drawn else None


def plot_single(key: str, title: str) -> Callable[[list[Run]], Figure | None]:
    """A plot of one per-round key, e.g. exactness or eval-perplexity."""
    def plot(runs: list[Run]) -> Figure | None:
        fig, (ax,) = figure()
        drawn = lines(runs, ax, key)
        finish(ax, title, key)
        return fig if drawn else None
    return plot


def plot_accuracy(runs: list[Run]) -> Figure | None:
    """Overall accuracy and, in further panels, accuracy per task family."""
    families = sorted({f for run in runs for f in accuracy_families(run.rows)})
    keys = [ACCURACY] + [FAMILY_PREFIX + f for f in families]
    if not any(series(run.rows, key)[0] for run in runs for key in keys):
        return None
    fig, axes = figure(len(keys))
    for ax, key in zip(axes, keys):
        lines(runs, ax, key)
        ax.set_ylim(-0.02, 1.02)
        finish(ax, "accuracy (all tasks)" if key == ACCURACY else key, "accuracy")
    return fig


def plot_bytes(runs: list[Run]) -> Figure | None:
    """Cumulative MB sent to the server (up) and to the clients (down, evaluation included)."""
    if not any("bytes-up" in r or "bytes-down" in r for run in runs for r in run.rows):
        return None
    fig, (ax,) = figure()
    for i, run in enumerate(runs):
        rounds, up = cumulative(run.rows, (M.BYTES_UP,))
        _, down = cumulative(run.rows, (M.BYTES_DOWN, M.BYTES_DOWN_EVAL))
        ax.plot(rounds, [b / MB for b in up], "-o", color=f"C{i}", label=f"{run.label} up",
                markersize=4)
        ax.plot(rounds, [b / MB for b in down], "--s", color=f"C{i}",
                label=f"{run.label} down", markersize=4)
    finish(ax, "cumulative traffic", "MB")
    return fig


def plot_accuracy_traffic(runs: list[Run]) -> Figure | None:
    """Accuracy against the cumulative MB sent (bytes-total: the training rounds' factors,
    up and down), so runs that send less (float16, a lower rank) compare at equal traffic."""
    fig, (ax,) = figure()
    drawn = False
    for i, run in enumerate(runs):
        mb, values = traffic_series(run.rows, ACCURACY)
        if mb:
            ax.plot(mb, values, "-o", color=f"C{i}", label=run.label, markersize=4)
            drawn = True
    ax.set_ylim(-0.02, 1.02)
    finish(ax, "accuracy against traffic", "accuracy")
    ax.set_xlabel("MB sent, cumulative (bytes-total: training, up + down)")
    return fig if drawn else None


def plot_step_loss(runs: list[Run]) -> Figure | None:
    """Each client's training loss at every local step it reported, one panel per run; the
    x axis runs over the rounds: (round - 1) x train-steps + local step."""
    pairs = [(run, losses) for run in runs if (losses := step_loss_series(run.rows))]
    if not pairs:
        return None
    fig, axes = figure(len(pairs))
    for ax, (run, losses) in zip(axes, pairs):
        for name in sorted(losses, key=client_order):
            ax.plot(*losses[name], "-", label=f"client {name}", linewidth=1)
        finish(ax, f"training loss per local step: {run.label}", "loss")
        ax.set_xlabel("local step (all rounds)")
    return fig


def client_order(name: str) -> tuple[int, int | str]:
    """Numeric client ids in numeric order, others after them."""
    return (0, int(name)) if re.fullmatch(r"-?\d+", name) else (1, name)


def plot_clients(metric: str) -> Callable[[list[Run]], Figure | None]:
    """Per-client `metric`: one panel per run, one line per client."""
    def plot(runs: list[Run]) -> Figure | None:
        # only the runs that report `metric` get a panel (no empty axes)
        pairs = [(run, c) for run in runs if (c := client_metrics(run.rows).get(metric, {}))]
        if not pairs:
            return None
        fig, axes = figure(len(pairs))
        for ax, (run, clients) in zip(axes, pairs):
            for name in sorted(clients, key=client_order):
                rounds, values = clients[name]
                ax.plot(rounds, values, "-o", label=f"client {name}", markersize=4)
            finish(ax, f"{metric} per client: {run.label}", metric)
        return fig
    return plot


def plot_update_norms(runs: list[Run]) -> Figure | None:
    """Each client's update norm per round (log scale), one panel per run: merged replies as
    lines, dropped ones as red crosses, and the round's bound (max-update-ratio x the lower
    median) dashed, so an outlier stands out."""
    pairs = [(run, norms) for run in runs if (norms := update_norms(run.rows))]
    if not pairs:
        return None
    fig, axes = figure(len(pairs))
    for ax, (run, norms) in zip(axes, pairs):
        for name in sorted(norms, key=client_order):
            kept = [(r, n) for r, n, dropped in norms[name] if not dropped]
            if kept:
                ax.plot(*zip(*kept), "-o", label=f"client {name}", markersize=4)
            if cut := [(r, n) for r, n, dropped in norms[name] if dropped]:
                ax.plot(*zip(*cut), "x", color="red", markersize=9, markeredgewidth=2,
                        label=f"client {name} dropped")
        rounds, bounds = series(run.rows, M.UPDATE_NORM_BOUND)
        if rounds:
            ax.plot(rounds, bounds, "--", color="black", label="bound")
        ax.set_yscale("log")
        finish(ax, f"update norm per client: {run.label}", "||B A - received||_F")
    return fig


def all_plots(runs: list[Run]) -> dict[str, Callable[[list[Run]], Figure | None]]:
    """File stem -> plot function, for every plot these runs may have data for."""
    plots = {"loss": plot_loss, "accuracy": plot_accuracy,
             "perplexity": plot_single(M.EVAL_PERPLEXITY, "eval perplexity per round"),
             "exactness": plot_single(M.EXACTNESS, "exactness per round (0 = exact merge)"),
             "bytes": plot_bytes, "update-norms": plot_update_norms,
             "step-loss": plot_step_loss, "accuracy-traffic": plot_accuracy_traffic}
    metrics = sorted({m for run in runs for m in client_metrics(run.rows)})
    plots.update({f"clients-{m.replace('/', '-')}": plot_clients(m) for m in metrics})
    return plots
