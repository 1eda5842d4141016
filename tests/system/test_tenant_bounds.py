"""Bounds on one declared tenant's client calls, all its connections together (docs/security.md,
"Client socket bounds"): calls in progress (limits.calls_per_tenant) and bytes read for its
ReadRange readers and not yet taken (limits.read_buffer_per_tenant). A real daemon with two
tenants; tenant b's process (its own uid) opens streams on several connections and never reads
them, and tenant a is served meanwhile.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Daemon, daemon_argv, make_model, upload_dir, wait_for
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
                                                 options=[("grpc.use_local_subchannel_pool", 1),
                                                          ("grpc.max_receive_message_length", 8 << 20)]))
         for _ in range(int(conns))]
req = pb.ReadRangeRequest(snapshot_id=sid, file=pb.FileRange(path=path), chunk_size=4 << 20)
calls = [stubs[i % len(stubs)].ReadRange(req) for i in range(int(n))]
"""


def test_a_tenants_calls_are_bounded_across_its_connections(root: Path, s3, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    uri = _model(s3, bucket, tmp_path, "big", seed=70, size=32 << 20)
    # a long stall timeout: b's unread streams must stay in progress however slow this machine is
    d, sock_a, sock_b = tenant_daemon(root, s3, bucket, limits={"calls_per_tenant": 4, "stream_stall_timeout": 600})
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
for c in calls:  # each stream's first chunk: the daemon has started (and counts) all four before any List
    next(c)
stub = pb_grpc.CacheStub(grpc.insecure_channel("unix://" + sock + "/weightcache.sock"))
deadline = time.monotonic() + 60
while True:  # the four streams are in progress, reading nothing more
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
            _release(child)
    finally:
        d.stop()


def _release(child: subprocess.Popen[str]) -> None:
    """Tell a child that holds its calls open (it waits for a line on stdin) to finish."""
    assert child.stdin is not None
    child.stdin.write("\n")
    child.stdin.close()
    child.wait(timeout=120)


def _buffer_waits(d: Daemon) -> int:
    return d.log_text().count("read_buffer_wait")


HOLD_UNREAD = """
import socket, struct
from weightcache.v1 import weightcache_pb2 as pb
sock, sid = sys.argv[1:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sock + "/fd.sock")
req = pb.FdRequest(acquire=pb.AcquireRequest(snapshot_id=sid)).SerializeToString()
s.sendall(struct.pack(">I", len(req)) + req)
print("sent", flush=True)
sys.stdin.readline()
"""


def test_descriptors_in_flight_are_bounded_per_tenant_whatever_its_uids(  # type: ignore[no-untyped-def]
    root: Path, s3, bucket: str, tmp_path: Path
) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    wide = make_model(tmp_path / "wide", shards=1)
    for i in range(25):
        (wide / f"extra-{i:02d}.json").write_text(json.dumps({"i": i}))
    upload_dir(s3, bucket, "wide/", wide)
    victim = _model(s3, bucket, tmp_path, "victim", seed=72)
    # Written as tenant_daemon does, then run without CAP_SYS_RESOURCE/CAP_SYS_ADMIN: like an
    # unprivileged daemon, the kernel holds it to RLIMIT_NOFILE for descriptors in flight.
    tenant_daemon(root, s3, bucket, fd_frame_timeout=2)[0].stop()
    argv = daemon_argv(root / "store", root / "sock", root / "admin" / "admin.sock", config=root / "weightcached.toml")
    with open(root / "daemon.log", "ab") as lf:
        proc = subprocess.Popen(["setpriv", "--bounding-set", "-sys_resource,-sys_admin", "--inh-caps=-all", *argv],
                                stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    d = Daemon(root, root / "store", root / "sock", root / "admin" / "admin.sock", proc, root / "daemon.log")
    sock_a, sock_b = root / "sock", root / "sock-b"
    children: list[subprocess.Popen[str]] = []
    try:
        d.wait_ready()
        with connect(sock_a) as a:
            va = a.ensure(victim, name="victim").snapshot_id
        with connect(sock_b) as b:
            wb = b.ensure(f"s3://{bucket}/wide/", name="wide").snapshot_id
        fds0 = len(os.listdir(f"/proc/{proc.pid}/fd"))
        soft, hard = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (fds0 + 120, hard))
        # tenant b: eight uids (a container picks its uids), one connection each, never read
        for k in range(8):
            argv_k = [*as_uid_argv(3100 + k, [GROUP], HOLD_UNREAD, preload=CHILD_PRELUDE), str(sock_b), wb]
            p = subprocess.Popen(argv_k, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/tmp")
            children.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == "sent"
        # past b's share the daemon sends nothing more and refuses b's readers that do not read ...
        wait_for(lambda: d.log_text().count('"fd_client_refused"') >= 4, 120, "b's unread connections refused")
        # ... and the kernel never refuses the daemon's descriptors to tenant a
        code = """
sock, sid = sys.argv[1:]
with FdConnection(sock + "/fd.sock") as fd:
    print(json.dumps(outcome(lambda: len(fd.acquire(sid)))))
"""
        assert "ok" in as_tenant(2001, code, str(sock_a), va)
        assert "ETOOMANYREFS" not in d.log_text() and "fd_send_failed" not in d.log_text()
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
    finally:
        for p in children:
            if p.stdin is not None:
                p.stdin.close()
            p.wait(timeout=60)
        d.stop()


def test_unread_manifests_of_a_huge_model_wait_for_the_tenants_read_buffer(  # type: ignore[no-untyped-def]
    root: Path, s3, bucket: str, tmp_path: Path
) -> None:
    n = 20_000  # tensors: a manifest message of a few MiB
    header = {
        f"model.layers.{i % 64}.t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(n)
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (tmp_path / "wide").mkdir()
    (tmp_path / "wide" / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(n))
    upload_dir(s3, bucket, "wide/", tmp_path / "wide")
    victim = _model(s3, bucket, tmp_path, "victim", seed=73)
    limits = {"read_buffer_per_tenant": "1MiB", "stream_stall_timeout": 600}
    d, sock_a, sock_b = tenant_daemon(root, s3, bucket, limits=limits)
    try:
        with connect(sock_b) as b:
            assert len(b.ensure(f"s3://{bucket}/wide/", name="wide").tensors) == n
        code = """
sock, = sys.argv[1:]
from weightcache.v1 import weightcache_pb2 as pb, weightcache_pb2_grpc as pb_grpc
opts = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20)]
stubs = [pb_grpc.CacheStub(grpc.insecure_channel("unix://" + sock + "/weightcache.sock", options=opts)) for _ in range(3)]
calls = [stubs[i % 3].Ensure(pb.EnsureRequest(model="wide")) for i in range(12)]
print("sent", flush=True)
sys.stdin.readline()
for c in calls:
    c.cancel()
"""
        argv = [*as_uid_argv(2001, [GROUP], code, preload=CHILD_PRELUDE), str(sock_b)]
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/tmp")
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "sent"
            # b's unread Ensures wait for room in its read buffer instead of each holding a
            # manifest message (and a client I/O thread to build it) ...
            wait_for(lambda: '"rpc": "Ensure"' in _buffer_wait_lines(d), 120, "an Ensure of b's to wait for room")
            # ... while tenant a is served
            with connect(sock_a) as a:
                assert a.ensure(victim, name="victim").snapshot_id
                assert [x.name for x in a.list()] == ["victim"]
        finally:
            _release(child)
    finally:
        d.stop()


def _buffer_wait_lines(d: Daemon) -> str:
    return "\n".join(ln for ln in d.log_text().splitlines() if "read_buffer_wait" in ln)
