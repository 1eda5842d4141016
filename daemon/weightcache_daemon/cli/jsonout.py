"""cachectl's one JSON shape (docs/cachectl.md, "JSON output").

Every ``--json`` answer is one JSON document on stdout:

    success   the command's object or list; protobuf fields by their proto names, every
              field present (zero values included), every integer a JSON number (protobuf's
              own MessageToDict writes 64-bit integers as strings), enums by name
    failure   {"error": {"code": "NOT_FOUND", "type": "NotFoundError", "message": "...",
              "command": "show"}} and a non-zero exit status (2 for bad input, 130 when
              interrupted, 1 otherwise); nothing on stderr

so ``cachectl ... --json | jq`` always has one document to read, and a script can tell a
failure from its shape as well as from the exit status.

A reader that stops early (``| head``) ends cachectl quietly with status 141, as a
SIGPIPE would, instead of with a BrokenPipeError traceback.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from weightcache.contract.errors import DaemonUnavailableError, InvalidInputError, WeightcacheError, code_for

__all__ = ["Interrupted", "dump", "error_document", "exit_code", "message_to_json", "quiet_exit_on_closed_pipe"]

# The codes an error document may carry besides the gRPC status names of the error tree.
DAEMON_UNAVAILABLE = "DAEMON_UNAVAILABLE"  # no daemon answered on the admin socket
USAGE = "USAGE"  # the command line itself is wrong (argparse)
CANCELLED = "CANCELLED"  # interrupted (Ctrl-C)


class Interrupted(WeightcacheError):
    """Ctrl-C: the message says what the daemon does with the work the command started."""


def _scalar(field: Any, value: Any) -> Any:  # a FieldDescriptor (two classes: python, upb)
    if field.type == FieldDescriptor.TYPE_ENUM:
        enum = field.enum_type.values_by_number.get(value)
        return enum.name if enum is not None else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return value.hex()
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_to_json(value)
    return value  # int (any width) stays a number, float, bool and str as they are


def _repeated(field: Any) -> bool:
    # protobuf 5.28+ says `is_repeated` and deprecates `label` (gone from the upb descriptors).
    flag = getattr(field, "is_repeated", None)
    return bool(flag) if flag is not None else bool(field.label == FieldDescriptor.LABEL_REPEATED)


def message_to_json(msg: Message) -> dict[str, Any]:
    """A message as plain JSON values: every field, integers as numbers."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {str(k): _scalar(value_field, v) for k, v in value.items()}
        elif _repeated(field):
            out[field.name] = [_scalar(field, v) for v in value]
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not msg.HasField(field.name):
            # An absent sub-message is null, not a message of zeros that never existed.
            out[field.name] = None
        else:
            out[field.name] = _scalar(field, value)
    return out


def quiet_exit_on_closed_pipe() -> None:
    """The reader of our output went away (``cachectl show --tensors | head``): end without a
    BrokenPipeError traceback, with the status a shell reports for a writer ended by SIGPIPE
    (141), as git or ls do, so that ``set -o pipefail`` scripts see the same thing for every
    tool. Python flushes stdout again at exit and would report the broken pipe once more:
    point the descriptor at /dev/null first (the recipe in the signal module's docs)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    os._exit(128 + 13)


def dump(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def error_code(exc: BaseException) -> str:
    if isinstance(exc, DaemonUnavailableError):
        return DAEMON_UNAVAILABLE
    if isinstance(exc, (KeyboardInterrupt, Interrupted)):
        return CANCELLED
    if isinstance(exc, WeightcacheError):
        return str(code_for(exc).name)
    return USAGE


def exit_code(exc: BaseException) -> int:
    if isinstance(exc, (KeyboardInterrupt, Interrupted)):
        return 130
    return 2 if isinstance(exc, InvalidInputError) or not isinstance(exc, WeightcacheError) else 1


def error_document(command: str, exc: BaseException | None, *, code: str = "", message: str = "") -> dict[str, Any]:
    """The one error shape: {"error": {"code", "type", "message", "command"}}."""
    return {
        "error": {
            "code": code or (error_code(exc) if exc is not None else USAGE),
            "type": type(exc).__name__ if exc is not None else "UsageError",
            "message": message or str(exc),
            "command": command,
        }
    }
