"""Hostile input: fuzzed safetensors headers and malformed RPCs. Every refusal is a clear
category (InvalidInputError / INVALID_ARGUMENT, NOT_FOUND), never a crash or a hang, and
nothing outside the store is touched."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness import Daemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightcache.errors import InvalidInputError
from weightcache.v1 import weightcache_pb2 as pb
from weightcache.v1 import weightcache_pb2_grpc as pb_grpc
from weightcache_daemon.safetensors_format import DTYPE_BITS, parse_header

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8)
)
json_value = st.recursive(
    json_leaf,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=20,
)

tensor_entry = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(sorted(DTYPE_BITS)), st.text(max_size=6)),
        "shape": st.one_of(st.lists(st.integers(-2, 2**40), max_size=5), json_value),
        "data_offsets": st.one_of(st.lists(st.integers(-5, 2**20), min_size=0, max_size=3), json_value),
    }
)
header_obj = st.dictionaries(st.text(max_size=12), st.one_of(tensor_entry, json_value), max_size=6)


def _check(header: bytes, size: int) -> None:
    try:
        tensors, _ = parse_header(header, size, "fuzz")
    except InvalidInputError as exc:
        assert "fuzz" in str(exc)
        return
    # accepted: the invariants of a valid file hold
    pos = 8 + len(header)
    for t in tensors:
        assert t.offset == pos and t.length >= 0
        pos += t.length
    assert pos == size


@settings(max_examples=400, deadline=500, suppress_health_check=[HealthCheck.too_slow])
@given(obj=header_obj, extra=st.integers(0, 4096))
def test_fuzzed_json_headers_never_crash(obj: dict[str, Any], extra: int) -> None:
    raw = json.dumps(obj).encode()
    _check(raw, 8 + len(raw) + extra)


@settings(max_examples=400, deadline=500)
@given(raw=st.binary(max_size=512), extra=st.integers(0, 1024))
def test_fuzzed_raw_headers_never_crash(raw: bytes, extra: int) -> None:
    _check(raw, 8 + len(raw) + extra)


def test_fuzz_summary(report) -> None:  # type: ignore[no-untyped-def]
    from test_validation import CASES

    report(
        "hostile files",
        "hypothesis: 400 random JSON headers + 400 random byte headers per run; "
        f"{len(CASES)} malformed files, one per rule (test_validation)",
        "each refused with its own message; no crash, no hang",
        "deadline 500 ms per example",
    )


def test_hostile_headers_stay_bounded() -> None:
    """Deep nesting, huge shapes, many keys: refused quickly, in bounded memory."""
    cases = [
        b"{" + b'"a":' * 1 + b"[" * 100_000 + b"]" * 100_000 + b"}",
        json.dumps({"a": {"dtype": "F32", "shape": [2**62] * 64, "data_offsets": [0, 4]}}).encode(),
        json.dumps(
            {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(200_000)}
        ).encode(),
    ]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for raw in cases:
        # CPU time of this process, not wall time: a loaded machine must not fail the test, but a
        # parser that goes quadratic on one of these still would
        t = time.process_time()
        try:
            parse_header(raw, 8 + len(raw) + 10, "hostile")
        except InvalidInputError:
            pass
        assert time.process_time() - t < 5
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 512, grown_mb


@pytest.fixture
def stubs(daemon: Daemon) -> tuple[Any, Any]:
    client = pb_grpc.CacheStub(grpc.insecure_channel(f"unix://{daemon.socket_dir / 'weightcache.sock'}"))
    admin = pb_grpc.AdminStub(grpc.insecure_channel(f"unix://{daemon.admin_socket}"))
    return client, admin


def _code(fn: Any, req: Any) -> grpc.StatusCode:
    try:
        out = fn(req)
        if hasattr(out, "__iter__") and not hasattr(out, "ListFields"):
            list(out)
    except grpc.RpcError as exc:
        assert exc.details(), "every refusal says why"
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_malformed_rpcs_are_refused_and_touch_nothing(
    daemon: Daemon, stubs: tuple[Any, Any], tmp_path: Path, tiny_model: Path, report
) -> None:  # type: ignore[no-untyped-def]
    client, admin = stubs
    sentinel = tmp_path / "outside.txt"
    sentinel.write_text("untouched")
    snap = daemon.ctl_json("prefetch", f"file://{tiny_model}/", "--name", "tiny")["snapshot_id"]
    INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    cases = [
        (client.Ensure, pb.EnsureRequest(model=""), INVALID),
        (client.Ensure, pb.EnsureRequest(model="../../etc/passwd"), NOT_FOUND),
        (client.Ensure, pb.EnsureRequest(model=f"file://{tiny_model}/", name="../escape"), INVALID),
        (client.Ensure, pb.EnsureRequest(model=f"file://{tiny_model}/", name="a" * 5000), INVALID),
        (client.Ensure, pb.EnsureRequest(model="tiny", include=["*"] * 5000), INVALID),
        (client.Ensure, pb.EnsureRequest(model="x\x00y"), INVALID),
        (client.ReadRange, pb.ReadRangeRequest(snapshot_id="../../index.db", file=pb.FileRange(path="x")), INVALID),
        (client.ReadRange, pb.ReadRangeRequest(snapshot_id="0" * 32, file=pb.FileRange(path="x")), NOT_FOUND),
        (
            client.ReadRange,
            pb.ReadRangeRequest(snapshot_id=snap, file=pb.FileRange(path="../../../index.db")),
            NOT_FOUND,
        ),
        (
            client.ReadRange,
            pb.ReadRangeRequest(snapshot_id=snap, file=pb.FileRange(path="config.json", offset=2**60)),
            INVALID,
        ),
        (client.ReadRange, pb.ReadRangeRequest(snapshot_id=snap), INVALID),
        (admin.Show, pb.ShowRequest(model="sha256:" + "g" * 64), NOT_FOUND),
        (admin.Evict, pb.EvictRequest(models=["tiny"], all_unpinned=True), INVALID),
        (admin.Evict, pb.EvictRequest(), INVALID),
        (admin.Pin, pb.PinRequest(model="nope"), NOT_FOUND),
        (admin.Prefetch, pb.PrefetchRequest(uri="tiny"), INVALID),
        (admin.Prefetch, pb.PrefetchRequest(uri="s3://b/x/", name="/abs"), INVALID),
    ]
    for fn, req, want in cases:
        assert _code(fn, req) == want, (req, want)
    # a message over the 4 MiB limit is refused by gRPC itself
    assert _code(client.Ensure, pb.EnsureRequest(model="x" * (5 << 20))) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sentinel.read_text() == "untouched"
    assert [m["name"] for m in daemon.ctl_json("ls")] == ["tiny"]
    assert daemon.ctl("verify").returncode == 0
    assert daemon.proc.poll() is None  # and the daemon is still up
    assert not any(p.name.startswith("escape") for p in (daemon.cache_dir / "snapshots").iterdir())
    assert os.listdir(daemon.cache_dir / "ingest") == []
    report(
        "hostile requests",
        f"{len(cases) + 1} malformed RPCs: bad ids, '..' names and paths, huge fields and messages",
        "INVALID_ARGUMENT / NOT_FOUND / RESOURCE_EXHAUSTED; nothing outside the store touched; daemon up",
        "",
    )
