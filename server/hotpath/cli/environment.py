"""Flags from the environment: every long option of a command also read from `HOTPATH_<FLAG>`.

Containers and Kubernetes configure servers by environment; deriving each variable from its flag's
name (`--model-repository` is `HOTPATH_MODEL_REPOSITORY`) gives every new flag one with no extra code.
Switches take 1/true/yes/on or 0/false/no/off; a repeatable flag takes its values separated by spaces,
quoted as in a shell.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass

PREFIX = "HOTPATH_"
_TRUE = frozenset(("1", "true", "yes", "on"))
_FALSE = frozenset(("0", "false", "no", "off", ""))
_KINDS = {int: "an integer", float: "a number"}


@dataclass(frozen=True)
class InvalidVariable:
    """A flag's default standing for an environment value that does not parse; reported only when the
    flag is not given on the command line, since a flag beats its variable."""

    variable: str
    value: str
    reason: str

    def __str__(self) -> str:
        return f"environment variable {self.variable}={self.value!r} is invalid: {self.reason}"


class RepeatedFromEnvironment(list):
    """A repeatable flag's values from its variable. argparse appends the flag's own values to a copy
    of it, of this type; `resolve_environment` then keeps only those, so a flag given beats its variable."""

    def __init__(self, values: object = ()) -> None:
        super().__init__(values)
        self.from_environment = len(self)

    def __copy__(self) -> RepeatedFromEnvironment:
        copy = RepeatedFromEnvironment(self)
        copy.from_environment = self.from_environment
        return copy


def variable_name(option: str) -> str:
    """The environment variable of a long option: `--grace-s` -> `HOTPATH_GRACE_S`."""
    return PREFIX + option.lstrip("-").replace("-", "_").upper()


def _long_option(action: argparse.Action) -> str | None:
    options = [option for option in action.option_strings if option.startswith("--")]
    return max(options, key=len) if options else None


def _convert(action: argparse.Action, text: str) -> object:
    """Read `text` as the command line would read the flag's value; ValueError says why it cannot be."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        word = text.strip().lower()
        if word not in _TRUE | _FALSE:
            raise ValueError(f"must be one of {', '.join(sorted(_TRUE))} or {', '.join(sorted(_FALSE - {''}))}")
        given = word in _TRUE
        return action.const if given else action.default
    if isinstance(action, argparse._AppendAction) and action.nargs is None:
        try:
            words = shlex.split(text)
        except ValueError as exc:
            raise ValueError(f"a repeatable flag's values are separated by spaces, quoted as in a shell: {exc}") from None
        return RepeatedFromEnvironment(_convert_one(action, word) for word in words)
    if not isinstance(action, argparse._StoreAction) or action.nargs not in (None, "?"):
        raise ValueError(f"{_long_option(action)} cannot be set from the environment")
    return _convert_one(action, text)


def _convert_one(action: argparse.Action, text: str) -> object:
    try:
        value = action.type(text) if action.type is not None else text
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None
    except (TypeError, ValueError):
        raise ValueError(f"expected {_KINDS.get(action.type, 'a valid value')}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"must be one of {', '.join(map(str, action.choices))}")
    return value


def read_environment(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """Default each long option of `parser` to its `HOTPATH_<FLAG>` variable, when set, and name the
    variable in the flag's help. Call it after adding every argument; a variable that does not parse
    becomes an InvalidVariable default, which `resolve_environment` reports."""
    environ = os.environ if environ is None else environ
    for action in parser._actions:
        option = _long_option(action)
        if option is None or action.dest in (argparse.SUPPRESS, "help") or action.default == argparse.SUPPRESS:
            continue
        variable = variable_name(option)
        action.help = f"{action.help} [env {variable}]" if action.help else f"[env {variable}]"
        if variable in environ:
            try:
                action.default = _convert(action, environ[variable])
            except ValueError as exc:
                action.default = InvalidVariable(variable, environ[variable], str(exc))


def resolve_environment(args: argparse.Namespace) -> None:
    """Finish parsed arguments: a repeatable flag given on the command line replaces its variable's
    values, and a variable the command relies on (its flag was not given) that does not parse exits
    with status 2, as argparse does for a bad flag, naming it."""
    for name, value in vars(args).items():
        if isinstance(value, RepeatedFromEnvironment) and len(value) > value.from_environment:
            setattr(args, name, value[value.from_environment:])
    invalid = [str(value) for value in vars(args).values() if isinstance(value, InvalidVariable)]
    if invalid:
        print("hotpath: error: " + "; ".join(invalid), file=sys.stderr)
        sys.exit(2)
