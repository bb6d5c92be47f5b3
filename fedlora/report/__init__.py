"""Plots and tables of finished runs: `fedlora report` and the table `fedlora simulate` prints."""

from __future__ import annotations

from pathlib import Path

from fedlora.report.plots import all_plots
from fedlora.report.runs import Run, load_run, load_runs
from fedlora.report.tables import (
    before_after,
    evaluation_failures,
    round_table,
    sample_answers,
    summary_markdown,
)

__all__ = ["Run", "before_after", "evaluation_failures", "load_run", "load_runs", "round_table",
           "sample_answers", "summary_markdown", "write_report"]

REPORT_MD = "report.md"


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per plot with data and report.md; returns the paths written.

    `out_dir` defaults to the first run's `report/` folder.
    """
    if not run_dirs:
        raise ValueError("no run folder given; pass one or more --output-dir folders of runs")
    runs = load_runs(list(run_dirs))
    out = Path(out_dir) if out_dir is not None else runs[0].path / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for stem, plot in all_plots(runs).items():
        fig = plot(runs)
        if fig is not None:
            fig.savefig(out / f"{stem}.png", dpi=110)
            images.append(out / f"{stem}.png")
    (out / REPORT_MD).write_text(markdown(runs, images))
    return images + [out / REPORT_MD]


def markdown(runs: list[Run], images: list[Path]) -> str:
    """report.md: the summary table, where each run lives, each run's base model against its
    federated adapter, a few of their answers and its evaluation failures, then every plot."""
    parts = ["# fedlora report", "", summary_markdown(runs), ""]
    parts += [f"- `{run.name}`: {run.path.resolve()}" for run in runs] + [""]
    for run in runs:
        if table := before_after(run.rows):
            parts += [f"## base model and federated adapter: `{run.name}`", "", "```", table,
                      "```", ""]
        if samples := sample_answers(run.rows):
            parts += [f"## sample answers, base and federated: `{run.name}`", "", "```",
                      samples, "```", ""]
        if failures := evaluation_failures(run.rows):
            parts += [f"## evaluation failures: `{run.name}`", "", "```", failures, "```", ""]
    for image in images:
        parts += [f"## {image.stem}", "", f"![{image.stem}]({image.name})", ""]
    return "\n".join(parts)
