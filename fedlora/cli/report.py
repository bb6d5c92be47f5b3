"""`fedlora report`: plots and a Markdown summary of one or more finished runs."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `fedlora report`."""
    p.add_argument("run_dirs", nargs="+", metavar="OUTPUT_DIR", type=Path,
                   help="the --output-dir of a run (holds metrics.jsonl); several are overlaid "
                        "on the same axes to compare strategies")
    p.add_argument("--out", "--output-dir", dest="out", type=Path,
                   help="where the PNGs and report.md go (default OUTPUT_DIR/report of the first)")


def run(args: argparse.Namespace) -> int:
    """Write the plots and report.md, print each path written."""
    from fedlora.report import write_report

    for path in write_report(args.run_dirs, args.out):
        print(path)
    return 0
