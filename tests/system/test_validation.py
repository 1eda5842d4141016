"""Safetensors validation (docs/architecture.md, decision 6): every rule refuses with its own message, and a
bad file in a model publishes nothing of that model while other models stay untouched."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from harness import Daemon, no_partial_files, upload_dir
from tests_helpers import st_bytes

from weightcache.errors import InvalidInputError
from weightcache_daemon.safetensors_format import MAX_HEADER, MAX_TENSORS, parse_header, validate_file

GOOD = {
    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    "b": {"dtype": "BF16", "shape": [2, 1], "data_offsets": [8, 12]},
}

# (case id, file bytes, expected fragment of the message)
CASES = [
    ("too-short", b"\x01\x02", "shorter than the 8-byte header length"),
    ("header-too-large", struct.pack("<Q", MAX_HEADER + 1) + b"{}", f"exceeds the {MAX_HEADER}-byte limit"),
    ("header-past-eof", st_bytes({}, length=500), "runs past the end"),
    ("header-too-small", st_bytes(None, raw=b"{", length=1), "too small to hold a JSON object"),
    ("not-object-start", st_bytes(None, raw=b'["x"]'), "does not start with '{'"),
    ("not-utf8", st_bytes(None, raw=b'{"\xff": 1}'), "not valid UTF-8"),
    ("not-json", st_bytes(None, raw=b'{"a": '), "not valid JSON"),
    (
        "duplicate-key",
        st_bytes(
            None,
            raw=b'{"a": {"dtype":"U8","shape":[1],"data_offsets":[0,1]}, "a": {"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
            data=b"x",
        ),
        "duplicate key 'a'",
    ),
    ("metadata-not-strings", st_bytes({"__metadata__": {"k": 1}}), "__metadata__ must map strings to strings"),
    (
        "unknown-dtype",
        st_bytes({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"x" * 16),
        "unknown dtype 'F128'",
    ),
    (
        "bad-shape",
        st_bytes({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}, b"x"),
        "is not a list of non-negative integers",
    ),
    ("bad-offsets", st_bytes({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0]}}, b"x"), "is not [begin, end]"),
    (
        "end-before-begin",
        st_bytes({"a": {"dtype": "U8", "shape": [0], "data_offsets": [1, 0]}}, b"x"),
        "end 0 is before begin 1",
    ),
    (
        "size-mismatch",
        st_bytes({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"x" * 8),
        "needs 12 bytes but data_offsets span 8",
    ),
    (
        "overflowing-shape",
        st_bytes({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 8]}}, b"x" * 8),
        "more than 2**64 elements",
    ),
    (
        "too-many-dims",
        st_bytes({"a": {"dtype": "U8", "shape": [1] * 65, "data_offsets": [0, 1]}}, b"x"),
        "65 dimensions, more than 64",
    ),
    (
        "gap",
        st_bytes({"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, b"xx"),
        "gap of 1 bytes before tensor 'a'",
    ),
    (
        "overlap",
        st_bytes(
            {
                "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]},
            },
            b"xxx",
        ),
        "overlaps the previous tensor",
    ),
    ("trailing-bytes", st_bytes(GOOD, b"x" * 13), "1 trailing bytes after the last tensor"),
    ("truncated-data", st_bytes(GOOD, b"x" * 11), "tensors need 12 data bytes but the file has 11"),
    ("missing-field", st_bytes({"a": {"dtype": "U8", "shape": [1]}}, b"x"), "missing field(s) data_offsets"),
    (
        "too-many-tensors",
        st_bytes({f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(MAX_TENSORS + 1)}),
        f"more than {MAX_TENSORS} tensors",
    ),
    (
        "sub-byte-dtype",
        st_bytes({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"xx"),
        "do not fill whole bytes",
    ),
]


@pytest.mark.parametrize(("case", "data", "message"), CASES, ids=[c[0] for c in CASES])
def test_each_rule_has_its_own_message(tmp_path: Path, case: str, data: bytes, message: str) -> None:
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(data)
    with pytest.raises(InvalidInputError) as exc:
        validate_file(str(path), f"file {path.name}")
    assert message in str(exc.value)
    assert f"file {case}.safetensors" in str(exc.value)


def test_valid_files_pass_including_empty_and_scalar() -> None:
    header = {
        "__metadata__": {"format": "pt"},
        "e": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]},
        "s": {"dtype": "F64", "shape": [], "data_offsets": [0, 8]},
        "f4": {"dtype": "F4", "shape": [4], "data_offsets": [8, 10]},
    }
    raw = json.dumps(header).encode()
    tensors, meta = parse_header(raw, 8 + len(raw) + 10, "ok")
    assert meta == {"format": "pt"}
    assert [t.name for t in tensors] == ["e", "s", "f4"]
    assert tensors[1].offset == 8 + len(raw) and tensors[1].length == 8


def test_bad_file_publishes_nothing_and_other_models_are_untouched(
    daemon: Daemon,
    s3,
    bucket: str,
    tiny_model: Path,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    daemon.ctl("prefetch", f"file://{tiny_model}/", "--name", "good")
    before = daemon.ctl_json("stats")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "model-00001-of-00002.safetensors").write_bytes(
        (tiny_model / "model-00001-of-00002.safetensors").read_bytes()
    )
    (bad / "model-00002-of-00002.safetensors").write_bytes(st_bytes(GOOD, b"x" * 13))  # trailing byte
    upload_dir(s3, bucket, "bad/", bad)
    r = daemon.ctl("prefetch", f"s3://{bucket}/bad/", "--name", "bad", check=False)
    assert r.returncode == 2
    assert "file model-00002-of-00002.safetensors of model bad: 1 trailing bytes after the last tensor" in r.stderr
    assert [m["name"] for m in daemon.ctl_json("ls")] == ["good"]
    after = daemon.ctl_json("stats")
    assert after["blobs"] == before["blobs"] and after["stored_bytes"] == before["stored_bytes"]
    assert not (daemon.cache_dir / "snapshots" / "bad").exists()
    no_partial_files(daemon)
    # the good model is still served, byte for byte
    assert daemon.ctl("verify", "good").returncode == 0
