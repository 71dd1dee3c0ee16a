"""``python -m recursive reproduce``: its options, and the command that runs the experiments and prints their
claims' verdicts."""

from __future__ import annotations

import argparse
import sys

from . import EXPERIMENTS, run_experiments


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m recursive reproduce`` on ``parser`` (an argparse sub-parser)."""
    parser.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                        help=f"any of {', '.join(EXPERIMENTS)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="small models and budgets: every experiment in minutes (a smoke run)")
    parser.add_argument("--out", default="reproduce",
                        help="folder for the tables, plots and summary (default: ./reproduce)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=reproduce_command)


def reproduce_command(args: argparse.Namespace) -> None:
    """``python -m recursive reproduce``: run the experiments and print each claim's verdict."""
    try:
        reports = run_experiments(args.experiments, quick=args.quick, out=args.out, device=args.device,
                                  progress=not args.no_progress)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    for report in reports:
        for claim in report.claims:
            print(f"{report.name:<12} {claim.verdict:<13} {claim.claim}: {claim.evidence}")
    print(f"tables and plots in {args.out} (summary.md)")
