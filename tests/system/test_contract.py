"""The wire contract: generated code matches protos/, every RPC and field is commented,
and errors map to the same categories on both sides."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grpc

from weightcache import errors

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_has_no_drift() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_protos.py"), "--check"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr


def test_every_rpc_and_field_is_commented() -> None:
    text = (ROOT / "protos" / "weightcache" / "v1" / "weightcache.proto").read_text()
    lines = text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        s = line.strip()
        is_field = re.match(r"^(repeated |optional )?[\w.]+ \w+ = \d+;", s)
        if s.startswith("rpc ") or is_field:
            commented = "//" in line or lines[i - 1].strip().startswith("//")
            if not commented:
                missing.append(f"line {i + 1}: {s}")
    assert not missing, missing
    assert "package weightcache.v1;" in text


def test_error_table_round_trips() -> None:
    for cls, code in errors.CODE_OF.items():
        exc = errors.from_code(code, "msg")
        assert type(exc) is cls and str(exc) == "msg"
        assert errors.from_code(code.name, "m").__class__ is cls
    assert isinstance(errors.from_code(grpc.StatusCode.UNKNOWN, "x"), errors.InternalError)
