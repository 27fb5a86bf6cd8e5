"""`hotpath label`: attach late ground truth to logged predictions, from a CSV, JSON lines or Parquet file.

Exit codes: 0 every label attached, 1 some ids matched no logged prediction (counted and listed),
2 for a usage or input error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hotpath._proto import model_config_pb2
from hotpath.errors import LoadError
from hotpath.evaluation.labels import LabelFileError, read_labels
from hotpath.evaluation.log import store_location
from hotpath.evaluation.store import Store, StoreError, open_store
from hotpath.serving.config import read_config

EXIT_CLEAN, EXIT_UNKNOWN, EXIT_ERROR = 0, 1, 2
SHOWN_UNKNOWN = 20
"""Unknown ids printed; the rest are counted."""


class CommandError(Exception):
    """A usage or input error of an evaluation command; printed and exits 2."""


def resolve_store(args: argparse.Namespace) -> tuple[Store, model_config_pb2.ModelEvaluationConfig]:
    """The store and evaluation config of `--model`: `--store` if given, else what the model's config.pbtxt names."""
    config = model_config_pb2.ModelEvaluationConfig()
    if args.model_repository is not None:
        model_dir = args.model_repository / args.model
        if not model_dir.is_dir():
            raise CommandError(f"no model '{args.model}' in {args.model_repository}")
        try:
            config = read_config(model_dir).evaluation
        except LoadError as exc:
            raise CommandError(exc.message) from None
        location = args.store or store_location(config, model_dir)
    elif args.store:
        location = args.store
    else:
        raise CommandError("give --model-repository (the store its config names) or --store (a Parquet directory, .sqlite file or postgresql:// URL)")
    if not location.startswith(("postgresql://", "postgres://")) and not Path(location).exists():
        raise CommandError(f"no evaluation store at {location}: has model '{args.model}' logged predictions (evaluation {{ }} in its config)?")
    try:
        return open_store(location), config
    except StoreError as exc:
        raise CommandError(str(exc)) from None


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that say which model and store a command reads."""
    parser.add_argument("--model", required=True, help="model name")
    parser.add_argument("--model-repository", type=Path, help="the server's model repository (finds the store its config names)")
    parser.add_argument("--store", help="the store itself: a Parquet store directory, a .sqlite file or a postgresql:// URL (overrides the config)")


def _label_command(args: argparse.Namespace) -> int:
    try:
        labels = read_labels(args.file)
    except LabelFileError as exc:
        raise CommandError(str(exc)) from None
    store, _ = resolve_store(args)
    try:
        unknown = store.attach_labels(args.model, labels, time.time())
    finally:
        store.close()
    print(f"model '{args.model}': {len(labels) - len(unknown)} label(s) attached, {len(unknown)} unknown id(s) from {args.file}")
    for request_id, row in unknown[:SHOWN_UNKNOWN]:
        print(f"unknown: {request_id}" + (f" row {row}" if row else ""))
    if len(unknown) > SHOWN_UNKNOWN:
        print(f"... and {len(unknown) - SHOWN_UNKNOWN} more")
    return EXIT_UNKNOWN if unknown else EXIT_CLEAN


def guarded(command):
    """Run `command(args)`, printing a CommandError as `error: ...` and returning 2."""
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except CommandError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
    return run


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Add `label` to a CLI; its `func(args)` returns the exit code."""
    label = subparsers.add_parser(
        "label", help="attach late ground truth to logged predictions by request id",
        description="Read (id, label[, row]) records from a .csv (with a header row), .jsonl or .parquet file and attach "
                    "them to the model's logged predictions. Ids that match no logged prediction are counted, listed "
                    "and not stored. Exit 0 all attached, 1 some unknown, 2 error.")
    label.add_argument("file", type=Path, help="labels: columns id (or request_id), label (or ground_truth), optional row")
    add_store_arguments(label)
    label.set_defaults(func=guarded(_label_command))
