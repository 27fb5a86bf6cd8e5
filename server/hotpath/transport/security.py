"""Who may call what: TLS files checked before the server starts, Triton's protocol restrictions, and
the audit log of model control.

Model control (RepositoryModelLoad and RepositoryModelUnload) is off unless the server runs with
`--model-control explicit`. Any protocol group may be restricted to callers that send a configured
header and value (Triton's `--grpc-restricted-protocol`); the `model-repository` group may also admit
callers whose mutual-TLS certificate names an allowed identity.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import Message

from hotpath._proto import grpc_service_pb2 as pb
from hotpath.errors import InferenceError
from hotpath.transport._frontend import ServerCall

audit_log = logging.getLogger("hotpath.audit")
"""One line per model control action: who asked (address, certificate identity, restriction header
present or not), what (load or unload of which model) and the result."""

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
PROTOCOLS: dict[str, tuple[str, ...]] = {
    "health": ("ServerLive", "ServerReady", "ModelReady"),
    "metadata": ("ServerMetadata", "ModelMetadata"),
    "inference": ("ModelInfer", "ModelStreamInfer"),
    "model-config": ("ModelConfig",),
    "model-repository": ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"),
    "statistics": ("ModelStatistics",),
    "shared-memory": (),
    "trace": (),
    "logging": (),
}
"""Triton's protocol groups and the RPCs of each that hotpath serves (it serves no shared-memory,
trace or logging RPCs, so restricting those groups is accepted and restricts nothing)."""
CONTROL_METHODS = frozenset(f"/{SERVICE}/{name}" for name in ("RepositoryModelLoad", "RepositoryModelUnload"))
MODEL_CONTROL_MODES = ("none", "explicit")
MAX_LOGGED_CHARS = 64
"""Most characters of a caller's value (model name, identity) an audit line repeats."""
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]


@dataclass(frozen=True)
class Restriction:
    """Triton's `--grpc-restricted-protocol`: the RPCs of `protocols` answer only callers whose
    metadata carries `key` (lower case, as gRPC sends it) with exactly `value`."""

    protocols: tuple[str, ...]
    key: str
    value: str


def parse_restriction(text: str) -> Restriction:
    """Read `<protocol>[,<protocol>...]:<key>=<value>` as Triton writes it; ValueError says what is wrong."""
    protocols, colon, header = text.partition(":")
    key, equals, value = header.partition("=")
    if not colon or not equals or not key or not protocols:
        raise ValueError(f"--grpc-restricted-protocol must be <protocol>[,<protocol>...]:<key>=<value>, got {text!r}")
    names = tuple(name.strip() for name in protocols.split(","))
    unknown = [name for name in names if name not in PROTOCOLS]
    if unknown:
        raise ValueError(f"--grpc-restricted-protocol protocols must be among {', '.join(PROTOCOLS)}, got {', '.join(unknown)}")
    return Restriction(names, key.strip().lower(), value)


def check_restrictions(restrictions: Iterable[Restriction]) -> None:
    """Refuse a protocol restricted twice (Triton's rule: one header per protocol)."""
    seen: set[str] = set()
    for restriction in restrictions:
        twice = seen.intersection(restriction.protocols)
        if twice:
            raise ValueError(f"--grpc-restricted-protocol names {', '.join(sorted(twice))} more than once; "
                             "give each protocol one key=value")
        seen.update(restriction.protocols)


def check_tls_files(cert: Path | None, key: Path | None, client_ca: Path | None) -> None:
    """Check, before listening, that the TLS files exist, are readable PEM and that the key matches the
    certificate: gRPC reads them only at the first handshake and would then fail every connection.

    Raises ValueError naming the file and the flag that gave it.
    """
    if (cert is None) != (key is None):
        raise ValueError("--tls-cert and --tls-key go together: give both for TLS, or neither for plaintext")
    if cert is None:
        if client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS with client certificates")
        return
    for flag, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-client-ca", client_ca)):
        if path is not None:
            try:
                path.read_bytes()
            except OSError as exc:
                raise ValueError(f"{flag} {path}: cannot read it: {exc.strerror}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=str(cert))
    except ssl.SSLError:
        raise ValueError(f"--tls-cert {cert}: not a PEM certificate chain") from None
    try:
        context.load_cert_chain(str(cert), str(key))
    except ssl.SSLError:
        raise ValueError(f"--tls-key {key}: not a PEM private key, or not the key of the certificate in {cert}") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=str(client_ca))
        except ssl.SSLError:
            raise ValueError(f"--tls-client-ca {client_ca}: not a PEM certificate bundle") from None


class ModelControlOff(InferenceError):
    """RepositoryModelLoad or RepositoryModelUnload on a server whose model control mode is none."""

    code = grpc.StatusCode.FAILED_PRECONDITION


def shown(value: str) -> str:
    """A caller's value quoted for a log line, cut to MAX_LOGGED_CHARS."""
    return repr(value) if len(value) <= MAX_LOGGED_CHARS else f"{value[:MAX_LOGGED_CHARS]!r}... ({len(value)} characters)"


def audit(call: ServerCall, action: str, model: str, result: str, header_key: str | None = None) -> None:
    """Write the audit line of one model control action, on the `hotpath.audit` logger."""
    identities = call.identities()
    header = ""
    if header_key is not None:
        present = any(key == header_key for key, _ in call.metadata())
        header = f" header {header_key!r} {'present' if present else 'absent'}"
    audit_log.info("%s model %s by %s identity %s%s: %s", action, shown(model), call.peer(),
                   ",".join(shown(name) for name in identities) if identities else "none", header, result)


class AccessPolicy:
    """Which RPCs are restricted and what admits a caller to them; built once from the settings.

    Unrestricted methods pay nothing: `guard_unary` and `guard_stream` return their handlers unchanged.
    """

    def __init__(self, restrictions: Iterable[Restriction], allowed_identities: Iterable[str]) -> None:
        self._headers: dict[str, Restriction] = {}
        for restriction in restrictions:
            for protocol in restriction.protocols:
                for name in PROTOCOLS[protocol]:
                    self._headers[f"/{SERVICE}/{name}"] = restriction
        self._identities = frozenset(allowed_identities)
        self._identity_methods = {f"/{SERVICE}/{name}" for name in PROTOCOLS["model-repository"]} if self._identities else set()

    def header_key(self, method: str) -> str | None:
        """The header key that admits callers to `method`, or None when no header restriction covers it."""
        restriction = self._headers.get(method)
        return None if restriction is None else restriction.key

    def refusal(self, call: ServerCall) -> str | None:
        """Why `call` may not proceed, or None when nothing restricts its method or the caller is admitted."""
        restriction = self._headers.get(call.method)
        by_identity = call.method in self._identity_methods
        if restriction is None and not by_identity:
            return None
        if restriction is not None:
            expected = restriction.value.encode()
            for key, value in call.metadata():
                if key == restriction.key and hmac.compare_digest(value.encode() if isinstance(value, str) else value, expected):
                    return None
        if by_identity and self._identities.intersection(call.identities()):
            return None
        name = call.method.rsplit("/", 1)[-1]
        ways = []
        if restriction is not None:
            ways.append(f"send the header '{restriction.key}' with its configured value")
        if by_identity:
            ways.append("connect with a client certificate whose common name or subject alternative name "
                        "--model-control-allow-identity allows")
        return f"{name} is restricted: {' or '.join(ways)}"

    def _restricts(self, method: str) -> bool:
        return method in self._headers or method in self._identity_methods

    def guard_unary(self, method: str, handler: Callable[[Message, ServerCall], Awaitable[None]]
                    ) -> Callable[[Message, ServerCall], Awaitable[None]]:
        """`handler` for `method`, answering callers the policy does not admit with PERMISSION_DENIED
        (and auditing a refused control action)."""
        if not self._restricts(method):
            return handler

        async def guarded(request: Message, call: ServerCall) -> None:
            refusal = self.refusal(call)
            if refusal is None:
                await handler(request, call)
                return
            if method in CONTROL_METHODS:
                audit(call, method.rsplit("/", 1)[-1], getattr(request, "model_name", ""), "refused: PERMISSION_DENIED",
                      self.header_key(method))
            call.finish(PERMISSION_DENIED, refusal)

        return guarded

    def guard_stream(self, method: str, handler: Callable[[ServerCall, asyncio.Queue], Awaitable[None]]
                     ) -> Callable[[ServerCall, asyncio.Queue], Awaitable[None]]:
        """The streaming counterpart of `guard_unary`: a refused caller's stream ends at once."""
        if not self._restricts(method):
            return handler

        async def guarded(call: ServerCall, messages: asyncio.Queue) -> None:
            refusal = self.refusal(call)
            if refusal is None:
                await handler(call, messages)
            else:
                call.finish(PERMISSION_DENIED, refusal)

        return guarded
