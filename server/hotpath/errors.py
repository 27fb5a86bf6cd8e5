"""Domain errors, each carrying the gRPC status it maps to.

The data plane raises these; the servicer turns them into a status in one place. Anything else that
escapes a request is a bug and becomes INTERNAL.
"""

from __future__ import annotations

import grpc

MAX_SHOWN_CHARS = 40
"""Most characters of a client's value an error message repeats."""
MAX_MESSAGE_CHARS = 2048
"""Longest status message: gRPC clients refuse trailers over 8 KiB and report RESOURCE_EXHAUSTED instead."""


def shown(value: object) -> str:
    """`value` quoted for an error message, cut to MAX_SHOWN_CHARS with its full length said."""
    text = str(value)
    if len(text) <= MAX_SHOWN_CHARS:
        return repr(text)
    return f"{text[:MAX_SHOWN_CHARS]!r}... ({len(text)} characters)"


class InferenceError(Exception):
    """An error a client should see, with the gRPC status code that describes it."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = f"{message[:MAX_MESSAGE_CHARS]}... (message cut from {len(message)} characters)"
        super().__init__(message)
        self.message = message


class InvalidArgument(InferenceError):
    """The request is malformed or does not match the model's inputs."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(InferenceError):
    """No such model, or no such version of it, is loaded."""

    code = grpc.StatusCode.NOT_FOUND


class ModelUnavailable(InferenceError):
    """The model exists but cannot serve right now (unloading, failed load)."""

    code = grpc.StatusCode.UNAVAILABLE


class QueueFull(InferenceError):
    """The model's queue is full; the client should back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ResponseTooLarge(InferenceError):
    """A response would exceed the server's message-size limit, which gRPC would fail without a word of why."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(InferenceError):
    """The request's deadline or queue timeout passed before it could run."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ModelExecutionError(InferenceError):
    """The model raised while running a batch."""

    code = grpc.StatusCode.INTERNAL


class LoadError(InferenceError):
    """A model could not be loaded; the previously served version (if any) keeps serving."""

    code = grpc.StatusCode.INVALID_ARGUMENT
