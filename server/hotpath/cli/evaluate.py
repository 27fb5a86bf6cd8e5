"""`hotpath evaluate`: model quality per span and version from logged predictions and their labels, or with
`--suggest N`, the rows most worth labelling next.

Exit codes, as `hotpath drift`: 0 clean, 1 when a span's quality alerts, 2 for a usage or input error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hotpath.cli.label import CommandError, add_store_arguments, guarded, resolve_store
from hotpath.drift.files import parse_utc, write_text_atomically
from hotpath.drift.job import parse_duration
from hotpath.drift.features import DriftError
from hotpath.drift.reference import Reference, load_reference, reference_path
from hotpath.evaluation.job import DEFAULT_MAX_DROP, DEFAULT_MIN_LABELS, EvaluationError, evaluate, suggest, summary
from hotpath.evaluation.report import write_report

EXIT_CLEAN, EXIT_ALERT = 0, 1


def _seconds(text: str) -> float:
    try:
        return parse_duration(text)
    except DriftError as exc:
        raise CommandError(str(exc)) from None


def _moment(text: str) -> float:
    try:
        return parse_utc(text)
    except ValueError as exc:
        raise CommandError(f"'{text}' is not an ISO 8601 time: {exc}") from None


def _reference(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    start, sep, end = text.partition("/")
    if not sep:
        raise CommandError(f"--reference must be START/END in ISO 8601, e.g. 2026-11-01T00:00Z/2026-11-08T00:00Z, got '{text}'")
    return _moment(start), _moment(end)


def _drift_reference(args: argparse.Namespace) -> Reference | None:
    """The drift reference `--suggest` ranks drifted regions by: `--drift-reference`, else the model's own if it has one."""
    path = args.drift_reference
    if path is None and args.model_repository is not None:
        path = reference_path(args.model_repository / args.model)
        if not path.exists():
            return None
    try:
        return load_reference(path) if path is not None else None
    except DriftError as exc:
        raise CommandError(str(exc)) from None


def _evaluate_command(args: argparse.Namespace) -> int:
    until = _moment(args.until) if args.until else time.time()
    last = _seconds(args.last)
    store, config = resolve_store(args)
    try:
        if args.suggest is not None:
            picks = suggest(store, args.model, config, until - last, until, args.suggest, _drift_reference(args))
            text = "id,row,reason,score\n" + "".join(f"{request_id},{row},{reason},{score:.6f}\n" for request_id, row, reason, score in picks)
            if args.output:
                write_text_atomically(args.output, text)
                print(f"wrote {len(picks)} id(s) worth labelling to {args.output}")
            else:
                sys.stdout.write(text)
            return EXIT_CLEAN
        result = evaluate(store, args.model, config, until, last, _seconds(args.span), reference=_reference(args.reference),
                          max_drop=args.max_drop, min_labels=args.min_labels)
    except EvaluationError as exc:
        raise CommandError(str(exc)) from None
    finally:
        store.close()
    print(summary(result))
    if args.json == "-":
        print(json.dumps(result.to_json(), indent=2))
    elif args.json:
        write_text_atomically(Path(args.json), json.dumps(result.to_json(), indent=2))
    if not args.no_report:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        base = args.model_repository / args.model / "evaluation" if args.model_repository else Path.cwd()
        report = args.report or base / "reports" / f"evaluate-{stamp}.html"
        print(f"report: {write_report(result, report, args.drift_report)}")
    return EXIT_ALERT if result.alert else EXIT_CLEAN


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Add `evaluate` to a CLI; its `func(args)` returns the exit code."""
    command = subparsers.add_parser(
        "evaluate", help="model quality per span from logged predictions and late labels; exit 1 on alert",
        description="Join the model's logged predictions with their labels and report, per span and model version, "
                    "the label coverage and the metrics that fit the output (accuracy, precision, recall, F1, ROC AUC, "
                    "log loss; or MAE, RMSE), with the change against a reference window. Needs scikit-learn "
                    "(pip install 'hotpath[evaluate]'). Exit 0 clean, 1 alert, 2 error.")
    add_store_arguments(command)
    command.add_argument("--last", default="7d", help="how far back to look, e.g. 7d (default 7d)")
    command.add_argument("--span", default="1d", help="length of each span, e.g. 1h, 1d (default 1d)")
    command.add_argument("--until", help="UTC end of the newest span, ISO 8601 (default: now)")
    command.add_argument("--reference", help="reference window START/END, ISO 8601 (default: the oldest span)")
    command.add_argument("--max-drop", type=float, default=DEFAULT_MAX_DROP,
                         help=f"relative worsening of the primary metric (accuracy, RMSE) at which a span alerts (default {DEFAULT_MAX_DROP})")
    command.add_argument("--min-labels", type=int, default=DEFAULT_MIN_LABELS,
                         help=f"labelled rows a span (and the reference) needs to be judged (default {DEFAULT_MIN_LABELS})")
    command.add_argument("--json", help="write the machine-readable result here ('-' for stdout)")
    command.add_argument("--report", type=Path, help="HTML report path (default <model dir>/evaluation/reports/evaluate-<time>.html)")
    command.add_argument("--no-report", action="store_true", help="skip the HTML report")
    command.add_argument("--drift-report", type=Path, help="a `hotpath drift` HTML report to show beside quality on the same page")
    command.add_argument("--suggest", type=int, metavar="N",
                         help="instead of evaluating, write N unlabelled rows of the window worth labelling, as "
                              "id,row,reason,score: by turns the least certain predictions (reason margin: the top two "
                              "probabilities' difference) and those in the most drifted regions (reason drift)")
    command.add_argument("--drift-reference", type=Path,
                         help="drift reference for --suggest (default <model dir>/drift/reference.json when it exists)")
    command.add_argument("--output", type=Path, help="with --suggest, the CSV file to write (default stdout)")
    command.set_defaults(func=guarded(_evaluate_command))
