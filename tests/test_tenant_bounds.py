"""Bounds on one declared tenant's client calls, all its connections together (docs/security.md,
"Client socket bounds"): calls in progress (limits.calls_per_tenant) and bytes read for its
ReadRange readers and not yet taken (limits.read_buffer_per_tenant). A real daemon with two
tenants; tenant b's process (its own uid) opens streams on several connections and never reads
them, and tenant a is served meanwhile.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Daemon, wait_for
from test_tenants import CHILD_PRELUDE, GROUP, _model, as_tenant, tenant_daemon
from tests_helpers import as_uid_argv, dir_for_others

from weightcache import connect


@pytest.fixture
def root() -> Iterator[Path]:
    d = dir_for_others("wc-tenant-bounds-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


OPEN_UNREAD = """
sock, sid, path, n, conns = sys.argv[1:]
from weightcache.v1 import weightcache_pb2 as pb, weightcache_pb2_grpc as pb_grpc
stubs = [pb_grpc.CacheStub(grpc.insecure_channel("unix://" + sock + "/weightcache.sock",
                                                 options=[("grpc.use_local_subchannel_pool", 1)]))
         for _ in range(int(conns))]
req = pb.ReadRangeRequest(snapshot_id=sid, file=pb.FileRange(path=path), chunk_size=4 << 20)
calls = [stubs[i % len(stubs)].ReadRange(req) for i in range(int(n))]
"""


def test_a_tenants_calls_are_bounded_across_its_connections(root: Path, s3, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    uri = _model(s3, bucket, tmp_path, "big", seed=70, size=32 << 20)
    d, sock_a, sock_b = tenant_daemon(root, s3, bucket, limits={"calls_per_tenant": 4})
    try:
        with connect(sock_a) as a:
            m = a.ensure(uri, name="big")
        with connect(sock_b) as b:
            mb = b.ensure(uri, name="big")
        shard = mb.files[0].path if mb.files[0].path.endswith(".safetensors") else mb.files[-1].path
        code = (
            OPEN_UNREAD
            + """
import time
stub = pb_grpc.CacheStub(grpc.insecure_channel("unix://" + sock + "/weightcache.sock"))
deadline = time.monotonic() + 60
while True:  # the four streams are counted once the daemon has started them
    try:
        stub.List(pb.ListRequest())
    except grpc.RpcError as e:
        out = {"code": e.code().name, "details": e.details()}
        break
    if time.monotonic() > deadline:
        out = {"code": "OK"}
        break
for c in calls:
    c.cancel()
print(json.dumps(out))
"""
        )
        refused = as_tenant(2001, code, str(sock_b), mb.snapshot_id, shard, "4", "2")
        assert refused["code"] == "RESOURCE_EXHAUSTED", refused
        assert "limits.calls_per_tenant is 4" in refused["details"], refused
        with connect(sock_a) as a:  # the other tenant was never bounded by b's calls
            assert [x.name for x in a.list()] == ["big"] and m.snapshot_id == mb.snapshot_id

        def b_lists() -> bool:
            with connect(sock_b) as b:
                try:
                    return [x.name for x in b.list()] == ["big"]
                except Exception:  # noqa: BLE001 - still at its bound: the cancels are on their way
                    return False

        wait_for(b_lists, 120, "b's cancelled streams to end and free its calls")
    finally:
        d.stop()


def test_bytes_read_for_a_tenants_unread_streams_are_bounded(root: Path, s3, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    uri = _model(s3, bucket, tmp_path, "big", seed=71, size=32 << 20)
    limits = {"read_buffer_per_tenant": "8MiB", "stream_stall_timeout": 600}
    d, sock_a, sock_b = tenant_daemon(root, s3, bucket, limits=limits)
    try:
        with connect(sock_b) as b:
            mb = b.ensure(uri, name="big")
        shard = next(f.path for f in mb.files if f.path.endswith(".safetensors"))
        # b opens six 4 MiB-chunk streams on three connections and reads none of them until told
        code = OPEN_UNREAD + 'print("opened", flush=True)\nsys.stdin.readline()\nfor c in calls:\n    c.cancel()\n'
        argv = [*as_uid_argv(2001, [GROUP], code, preload=CHILD_PRELUDE), str(sock_b), mb.snapshot_id, shard, "6", "3"]
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/tmp")
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "opened"
            # what the daemon read for b's readers stays within b's budget: the streams past it
            # wait for room, holding nothing ...
            wait_for(lambda: _buffer_waits(d) > 0, 120, "a stream of b's to wait for read buffer room")
            # ... while tenant a reads, with a budget of its own
            with connect(sock_a) as a:
                ma = a.ensure(uri, name="big")
                assert len(a.read_range(ma.snapshot_id, shard, length=8 << 20)) == 8 << 20
        finally:
            assert child.stdin is not None
            child.stdin.write("\n")
            child.stdin.close()
            child.wait(timeout=120)
    finally:
        d.stop()


def _buffer_waits(d: Daemon) -> int:
    return d.log_text().count("read_buffer_wait")
