"""Framing of fd.sock: 4-byte big-endian length + one protobuf message, with descriptors
as SCM_RIGHTS ancillary data on the sendmsg() that carries the frame (see the proto)."""

from __future__ import annotations

import array
import socket
import struct

MAX_FRAME = 16 << 20  # a response (daemon -> client): an Acquire for thousands of files stays far below
# A request (client -> daemon) names one snapshot id: a few dozen bytes. The daemon reads no
# more than this per frame, so a client cannot make it buffer more (docs/security.md).
MAX_REQUEST_FRAME = 4096
MAX_FDS_PER_MSG = 250  # the kernel's SCM_MAX_FD is 253


def pack(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise ValueError(f"fd.sock frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return struct.pack(">I", len(payload)) + payload


# Received descriptors are close-on-exec from the moment they exist: a program the client execs
# must not inherit leases it never asked for (forked children still share them, and anything
# that needs a path uses /proc/<opener>/fd, which does not depend on inheritance).
_RECV_FLAGS = socket.MSG_CMSG_CLOEXEC


def recv_frame(sock: socket.socket) -> tuple[bytes, list[int]]:
    """Blocking receive of one frame and the descriptors that came with it.

    Raises ConnectionError on EOF, or when the kernel dropped descriptors because this
    process is at its open-file limit. Descriptors are closed when the frame is refused.
    """
    fds: list[int] = []
    header = b""
    while len(header) < 4:
        data, anc, flags, _ = sock.recvmsg(4 - len(header), socket.CMSG_SPACE(MAX_FDS_PER_MSG * 4), _RECV_FLAGS)
        fds.extend(_fds(anc))
        _check_truncated(flags, fds)
        if not data:
            _close(fds)
            raise ConnectionError("fd.sock closed by the peer")
        header += data
    (n,) = struct.unpack(">I", header)
    if n > MAX_FRAME:
        _close(fds)
        raise ConnectionError(f"fd.sock frame of {n} bytes exceeds {MAX_FRAME}")
    body = bytearray()
    while len(body) < n:
        data, anc, flags, _ = sock.recvmsg(n - len(body), socket.CMSG_SPACE(MAX_FDS_PER_MSG * 4), _RECV_FLAGS)
        fds.extend(_fds(anc))
        _check_truncated(flags, fds)
        if not data:
            _close(fds)
            raise ConnectionError("fd.sock closed in the middle of a frame")
        body += data
    return bytes(body), fds


def _check_truncated(flags: int, fds: list[int]) -> None:
    if flags & socket.MSG_CTRUNC:
        _close(fds)
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        raise ConnectionError(
            f"descriptors from fd.sock were dropped by the kernel: this process is at its open-file limit "
            f"({soft}, hard {hard}); raise it (ulimit -n, or resource.setrlimit) before opening this model"
        )


def _fds(anc: list[tuple[int, int, bytes]]) -> list[int]:
    out: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            out.extend(arr)
    return out


def _close(fds: list[int]) -> None:
    import os

    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
