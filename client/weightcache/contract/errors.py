"""The error tree shared by the daemon, cachectl and the client library.

    WeightcacheError
    ├── NotFoundError          NOT_FOUND            no such model, snapshot, file or blob
    ├── AlreadyExistsError     ALREADY_EXISTS
    ├── BusyError              FAILED_PRECONDITION  in use (leased, locked by another daemon)
    ├── InvalidInputError      INVALID_ARGUMENT     bad request or bad file (names the rule)
    ├── CorruptedError         DATA_LOSS            bytes do not match their digest
    ├── PermissionDeniedError  PERMISSION_DENIED    caller or source not allowed
    ├── ExhaustedError         RESOURCE_EXHAUSTED   out of space, over capacity, too many clients
    ├── SourceError            UNAVAILABLE          the source (S3, directory, HTTP) failed
    ├── DeadlineError          DEADLINE_EXCEEDED
    ├── InternalError          INTERNAL             a bug: the message says where
    └── DaemonUnavailableError (client side only)   no daemon answers on the socket: not running,
                                                    wrong path, socket directory not mounted

Every message carries its context ("blob sha256:ab12… of model llama-8b: …").
``CODE_OF`` / ``ERROR_OF`` are the one table between these classes and gRPC
status codes; the daemon maps exceptions with it and the client maps statuses
back, so a caller sees the same category and message on both sides.
"""

from __future__ import annotations

import grpc

__all__ = [
    "CODE_OF",
    "ERROR_OF",
    "AlreadyExistsError",
    "BusyError",
    "CorruptedError",
    "DaemonUnavailableError",
    "DeadlineError",
    "ExhaustedError",
    "InternalError",
    "InvalidInputError",
    "NotFoundError",
    "PermissionDeniedError",
    "SourceError",
    "WeightcacheError",
    "from_code",
    "from_rpc_error",
]


class WeightcacheError(Exception):
    """Base of every error weightcache raises on purpose."""


class NotFoundError(WeightcacheError):
    pass


class AlreadyExistsError(WeightcacheError):
    pass


class BusyError(WeightcacheError):
    pass


class InvalidInputError(WeightcacheError, ValueError):
    pass


class CorruptedError(WeightcacheError):
    pass


class PermissionDeniedError(WeightcacheError, PermissionError):
    pass


class ExhaustedError(WeightcacheError):
    pass


class SourceError(WeightcacheError):
    pass


class DeadlineError(WeightcacheError, TimeoutError):
    pass


class InternalError(WeightcacheError):
    pass


class DaemonUnavailableError(WeightcacheError, ConnectionError):
    """No daemon answers: the socket is missing, refuses connections, or the connection broke.

    Raised by the client and cachectl themselves (the daemon never sends it), so that "is the
    daemon running?" is one category everywhere, distinct from a source failing (SourceError).
    """


CODE_OF: dict[type[WeightcacheError], grpc.StatusCode] = {
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    BusyError: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    CorruptedError: grpc.StatusCode.DATA_LOSS,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    ExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    SourceError: grpc.StatusCode.UNAVAILABLE,
    DeadlineError: grpc.StatusCode.DEADLINE_EXCEEDED,
    InternalError: grpc.StatusCode.INTERNAL,
}
ERROR_OF: dict[grpc.StatusCode, type[WeightcacheError]] = {code: cls for cls, code in CODE_OF.items()}


def code_for(exc: WeightcacheError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in CODE_OF:
            return CODE_OF[cls]
    return grpc.StatusCode.INTERNAL


# gRPC's own words when no daemon took the call (as opposed to an UNAVAILABLE the daemon sent).
# "Stream removed (sendmsg: Broken pipe)" is a daemon that died while a call was streaming.
_TRANSPORT_FAILURES = (
    "failed to connect to all addresses",
    "Socket closed",
    "Connection reset",
    "connect failed",
    "Stream removed",
)


def from_rpc_error(exc: grpc.RpcError) -> WeightcacheError:
    """The exception for a failed call, with the daemon's message."""
    details = exc.details() or ""
    if exc.code() == grpc.StatusCode.UNAVAILABLE and any(t in details for t in _TRANSPORT_FAILURES):
        return DaemonUnavailableError(
            f"weightcached is not answering: {details} (is it running? start or restart it; once it is back, "
            "connect again)"
        )
    return from_code(exc.code(), details)


def from_code(code: grpc.StatusCode | str, message: str) -> WeightcacheError:
    """The exception for a gRPC status (or its name, as fd.sock sends it)."""
    if isinstance(code, str):
        code = grpc.StatusCode[code] if code in grpc.StatusCode.__members__ else grpc.StatusCode.UNKNOWN
    cls = ERROR_OF.get(code)
    if cls is None:
        if code == grpc.StatusCode.UNAVAILABLE:
            cls = SourceError
        else:
            cls = InternalError
            message = f"{code.name}: {message}"
    return cls(message)
