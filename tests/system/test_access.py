"""Who may do what: client allow-list, read-only descriptors, leases seen by the admin."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from harness import Daemon, wait_for, write_config

from weightcache import PermissionDeniedError, connect
from weightcache._fd import FdConnection


def test_client_cannot_fetch_a_source_outside_the_allow_list(daemon_factory, s3_model: str, s3) -> None:  # type: ignore[no-untyped-def]
    bucket = s3_model.split("/")[2]
    d = daemon_factory(client_sources=[f"s3://{bucket}/allowed/*"])
    with connect(d.socket_dir) as c, pytest.raises(PermissionDeniedError) as exc:
        c.ensure(s3_model)
    assert s3_model in str(exc.value) and "client_sources" in str(exc.value)
    assert d.ctl_json("ls") == []  # nothing fetched
    # the admin may; then the client can use it by name
    d.ctl("prefetch", s3_model, "--name", "tiny")
    with connect(d.socket_dir) as c:
        assert c.ensure("tiny").snapshot_id


def test_configured_daemon_defaults_to_no_client_sources(tmp_path: Path, s3, s3_model: str) -> None:  # type: ignore[no-untyped-def]
    from harness import start_daemon

    cfg = write_config(tmp_path / "c.toml", s3)  # no client_sources key
    d = start_daemon(tmp_path / "d", s3, config=cfg)
    try:
        with connect(d.socket_dir) as c, pytest.raises(PermissionDeniedError):
            c.ensure(s3_model)
    finally:
        d.stop()


def test_descriptors_are_read_only(daemon: Daemon, s3_model: str, report) -> None:  # type: ignore[no-untyped-def]
    snap = daemon.ctl_json("prefetch", s3_model, "--name", "tiny")["snapshot_id"]
    with FdConnection(daemon.socket_dir / "fd.sock") as conn:
        files = conn.acquire(snap)
        assert len(files) == 5
        for f in files:
            try:
                assert fcntl.fcntl(f.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
                assert fcntl.fcntl(f.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC  # never inherited across exec
                with pytest.raises(OSError) as e1:
                    os.pwrite(f.fd, b"x", 0)
                assert e1.value.errno == errno.EBADF
                with pytest.raises(OSError) as e2:
                    os.ftruncate(f.fd, 0)
                assert e2.value.errno in (errno.EBADF, errno.EINVAL)
                if f.size:
                    with pytest.raises(PermissionError):
                        mmap.mmap(f.fd, f.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_WRITE)
                assert os.fstat(f.fd).st_mode & 0o222 == 0
                assert os.fstat(f.fd).st_size == f.size
            finally:
                os.close(f.fd)
        listed = daemon.ctl_json("ls")[0]["leases"]
        assert [(le["pid"], le["uid"]) for le in listed] == [(os.getpid(), os.getuid())]
    # logged right after the descriptors are sent: the client may have them before the line is written
    wait_for(lambda: "descriptors_granted" in daemon.log_text(), 60, "the grant in the daemon's log")
    assert f'"peer_pid": {os.getpid()}' in daemon.log_text()
    report(
        "access",
        "write through a granted descriptor: pwrite, ftruncate, shared writable mmap",
        "all refused (O_RDONLY, blob 0444); the grant is audit-logged with pid/uid/gid",
        "",
    )


def test_lease_released_when_client_process_dies(daemon: Daemon, s3_model: str) -> None:
    snap = daemon.ctl_json("prefetch", s3_model, "--name", "tiny")["snapshot_id"]
    code = textwrap.dedent(f"""
        import sys
        from weightcache._fd import FdConnection
        c = FdConnection({str(daemon.socket_dir / "fd.sock")!r})
        c.acquire({snap!r})
        print("held", flush=True)
        sys.stdin.readline()  # holds the lease until it is killed (or the test goes away)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    assert [le["pid"] for le in daemon.ctl_json("ls")[0]["leases"]] == [p.pid]
    p.kill()
    p.wait()
    wait_for(lambda: daemon.ctl_json("ls")[0]["leases"] == [], 60, "the dead client's lease to go")


def test_unknown_and_malformed_snapshots_on_fd_sock(daemon: Daemon) -> None:
    from weightcache import InvalidInputError, NotFoundError

    with FdConnection(daemon.socket_dir / "fd.sock") as conn:
        with pytest.raises(NotFoundError):
            conn.acquire("0" * 32)
        with pytest.raises(InvalidInputError):
            conn.acquire("../../etc/passwd")
        with pytest.raises(InvalidInputError):
            conn.acquire("x" * 100_000)


def test_client_socket_has_no_admin_service(daemon: Daemon) -> None:
    import grpc

    from weightcache.v1 import weightcache_pb2 as pb
    from weightcache.v1 import weightcache_pb2_grpc as pb_grpc

    stub = pb_grpc.AdminStub(grpc.insecure_channel(f"unix://{daemon.socket_dir / 'weightcache.sock'}"))
    with pytest.raises(grpc.RpcError) as exc:
        stub.Evict(pb.EvictRequest(all_unpinned=True))
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert os.stat(daemon.admin_socket).st_mode & 0o777 == 0o600
    assert daemon.admin_socket.parent != daemon.socket_dir


def test_health_service(daemon: Daemon) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"unix://{daemon.socket_dir / 'weightcache.sock'}"))
    assert stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
