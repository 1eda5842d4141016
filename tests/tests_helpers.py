"""Small fixture writers shared by tests."""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def st_bytes(header: object, data: bytes = b"", *, raw: bytes | None = None, length: int | None = None) -> bytes:
    """A safetensors file's bytes: the 8-byte length (``length`` to lie about it), the JSON of
    ``header`` (or ``raw`` header bytes), then ``data``."""
    h = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def write_u8_safetensors(path: Path, size: int, seed: int) -> None:
    """One U8 tensor 'w' of `size` random bytes."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.write(np.random.default_rng(seed).bytes(size))


def write_u8_model(directory: Path, size: int, seed: int) -> Path:
    """A small model of distinct content: one safetensors file of `size` bytes plus a config."""
    directory.mkdir(parents=True, exist_ok=True)
    write_u8_safetensors(directory / "model.safetensors", size, seed)
    (directory / "config.json").write_text(json.dumps({"seed": seed}))
    return directory


def as_uid_argv(uid: int, groups: Sequence[int], code: str, *, preload: str = "") -> list[str]:
    """The command line of a Python child that runs ``code`` as a real other uid (gid = uid,
    supplementary ``groups``): the one way tests act as a second user.

    The interpreter and its libraries live under root's home on the test machines, where the
    other uid cannot read: ``preload`` (imports, helper functions) runs first, still as root,
    then the child drops to the new credentials before ``code`` touches a socket or a file, so
    every check the daemon makes sees the other uid. Extra arguments after the returned argv
    reach ``code`` as ``sys.argv[1:]``."""
    drop = f"""
import os
os.setgroups({list(groups)!r})
os.setgid({uid})
os.setuid({uid})
assert (os.getuid(), os.getgid(), os.geteuid()) == ({uid}, {uid}, {uid}), "the child still runs as root"
"""
    return [sys.executable, "-c", "\n".join([textwrap.dedent(preload), drop, textwrap.dedent(code)])]


def dir_for_others(prefix: str) -> Path:
    """A fresh directory under /tmp another uid can enter (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(d, 0o755)
    return d
