"""The `hotpath reference` and `hotpath drift` commands.

Exit codes: 0 clean, 1 when the drift job alerts, 2 for a usage or input error (bad path, bad data,
no reference), so `hotpath drift` drops into cron, Airflow or CI as is.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hotpath.drift.features import DriftError
from hotpath.drift.files import parse_utc
from hotpath.drift.job import DEFAULT_ALERT_SHARE, load_thresholds, parse_duration, run_job, summary
from hotpath.drift.recorder import default_window_dir
from hotpath.serving.config import read_config
from hotpath.drift.reference import (DEFAULT_BINS, DEFAULT_MAX_CATEGORIES, build_reference, load_reference,
                                     reference_path, save_reference)
from hotpath.drift.report import write_report
from hotpath.errors import LoadError

EXIT_CLEAN, EXIT_ALERT, EXIT_ERROR = 0, 1, 2


def _reference_command(args: argparse.Namespace) -> int:
    reference = build_reference(args.model_repository, args.model, args.data, version=args.version, bins=args.bins,
                                max_categories=args.max_categories, predictions=not args.no_predictions)
    path = save_reference(reference, args.model_repository / args.model)
    print(f"wrote {path}: reference {reference.reference_id}, {reference.rows} rows, "
          f"{len(reference.features)} features of model '{args.model}' version {reference.version}")
    return EXIT_CLEAN


def _locations(args: argparse.Namespace) -> tuple[Path, Path]:
    if args.model_repository is None or args.model is None:
        if args.reference is None or args.windows is None:
            raise DriftError("give --model-repository and --model, or both --reference and --windows")
        return args.reference, args.windows
    model_dir = args.model_repository / args.model
    if not model_dir.is_dir():
        raise DriftError(f"no model '{args.model}' in {args.model_repository}")
    windows = args.windows
    if windows is None:
        try:
            configured = read_config(model_dir).drift.output_dir
        except LoadError as exc:
            raise DriftError(exc.message) from None
        windows = Path(configured) if configured else default_window_dir(model_dir)
    return args.reference or reference_path(model_dir), windows


def _drift_command(args: argparse.Namespace) -> int:
    reference_file, windows = _locations(args)
    reference = load_reference(reference_file)
    result = run_job(
        reference, windows, version=args.version, span=parse_duration(args.span),
        step=parse_duration(args.step) if args.step else None, last=parse_duration(args.last) if args.last else None,
        until=parse_utc(args.until) if args.until else None,
        thresholds=load_thresholds(args.thresholds, args.min_count), alert_share=args.alert_share)
    print(summary(result))
    if args.json == "-":
        print(json.dumps(result.to_json(), indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2))
    if not args.no_report:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        report = args.report or Path(windows).parent / "reports" / f"drift-{stamp}.html"
        print(f"report: {write_report(result, reference, report)}")
    return EXIT_ALERT if result.alert else EXIT_CLEAN


def _guarded(command):
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except DriftError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
    return run


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `reference` and `drift` to a CLI; each parsed command's `func(args)` returns the exit code."""
    reference = subparsers.add_parser(
        "reference", help="build a model's drift reference from training or evaluation data",
        description="Bin edges, categories and counts of reference data (and of the model's predictions on "
                    "it), stored as <model dir>/drift/reference.json. Restart or reload the model afterwards.")
    reference.add_argument("--model-repository", type=Path, required=True, help="the server's model repository")
    reference.add_argument("--model", required=True, help="model name (its directory in the repository)")
    reference.add_argument("--data", type=Path, required=True,
                           help=".npz (one array per input), .npy (single-input models) or .csv with a header row")
    reference.add_argument("--version", type=int, help="model version to run for predictions (default: newest)")
    reference.add_argument("--bins", type=int, default=DEFAULT_BINS, help=f"quantile bins per numeric feature (default {DEFAULT_BINS})")
    reference.add_argument("--max-categories", type=int, default=DEFAULT_MAX_CATEGORIES,
                           help=f"most frequent categories kept per categorical feature (default {DEFAULT_MAX_CATEGORIES})")
    reference.add_argument("--no-predictions", action="store_true", help="do not run the model; inputs only")
    reference.set_defaults(func=_guarded(_reference_command))

    drift = subparsers.add_parser(
        "drift", help="compare recorded windows with the reference; exit 1 on alert",
        description="Merge drift windows into spans, run data-quality rules and distances (KS, D1, PSI, JS) "
                    "per feature, each held to its threshold and to what noise gives at the reference's and the "
                    "span's sizes; print a summary, write an HTML report. Exit 0 clean, 1 alert, 2 error.")
    drift.add_argument("--model-repository", type=Path, help="the server's model repository")
    drift.add_argument("--model", help="model name")
    drift.add_argument("--reference", type=Path, help="reference file (default <model dir>/drift/reference.json)")
    drift.add_argument("--windows", type=Path,
                       help="window directory (default: the model's drift.output_dir, else <model dir>/drift/windows)")
    drift.add_argument("--version", type=int, help="only windows of this model version (default: all)")
    drift.add_argument("--span", default="1h", help="length of each span, e.g. 10m, 1h, 1d (default 1h)")
    drift.add_argument("--step", help="distance between span starts for sliding spans (default: --span)")
    drift.add_argument("--last", help="how far back to look (default: one span)")
    drift.add_argument("--until", help="UTC end of the newest span, ISO 8601 (default: end of the newest window)")
    drift.add_argument("--thresholds", type=Path, help='JSON {"defaults": {...}, "features": {"x[3]": {...}}}')
    drift.add_argument("--min-count", type=int, help="values a feature needs in a span for distances (default 1000)")
    drift.add_argument("--alert-share", type=float, default=DEFAULT_ALERT_SHARE,
                       help=f"share of drifting inputs (or outputs) at which the model alerts (default "
                            f"{DEFAULT_ALERT_SHARE}); one severe or important feature alerts on its own")
    drift.add_argument("--json", help="write the machine-readable result here ('-' for stdout)")
    drift.add_argument("--report", type=Path, help="HTML report path (default <windows>/../reports/drift-<time>.html)")
    drift.add_argument("--no-report", action="store_true", help="skip the HTML report")
    drift.set_defaults(func=_guarded(_drift_command))


def main(argv: list[str] | None = None) -> int:
    """Run one of the drift commands, as `python -m hotpath.drift.cli reference|drift ...`."""
    parser = argparse.ArgumentParser(prog="python -m hotpath.drift.cli")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
