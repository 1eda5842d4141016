"""Bounds on the gRPC client socket (config.ClientLimits), against a real daemon.

The abuser is a separate process on several connections; the daemon's open-file limit is
lowered (prlimit) so that a daemon that kept a descriptor per stalled stream would run out,
as one did. Every wait is for an observable state (the daemon's log, a call's status) with a
generous deadline; nothing asserts on wall-clock time.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness import Daemon, make_model, start_daemon, wait_for

from weightcache.v1 import weightcache_pb2 as pb
from weightcache.v1 import weightcache_pb2_grpc as pb_grpc
from weightcache_daemon.config import ClientLimits, load
from weightcache_daemon.ingest.globs import GlobCache

MiB = 1 << 20
STALL = 3.0  # limits.stream_stall_timeout of the daemons here
CONNECTIONS, STREAMS = 4, 16  # the abuser's connections, and streams on each (= limits.streams_per_connection)


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 16 MiB shard: a ReadRange of it does not fit any transport window."""
    return make_model(tmp_path_factory.mktemp("bounds") / "big", tiny=False, size=16 * MiB, shards=1)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _stub(d: Daemon) -> pb_grpc.CacheStub:
    return pb_grpc.CacheStub(grpc.insecure_channel(f"unix://{d.socket_dir}/weightcache.sock"))


# The abuser: CONNECTIONS connections (a local subchannel pool each, so they are distinct),
# STREAMS ReadRange calls of the whole shard on each, plus Ensure calls; it reads one message
# of each, then nothing until told, then drains every call and reports how each ended.
ABUSE = textwrap.dedent("""
    import json, sys, grpc
    from weightcache.v1 import weightcache_pb2 as pb, weightcache_pb2_grpc as pb_grpc
    sock, sid, shard, uri, conns, streams = sys.argv[1:7]
    calls = []
    def stub():
        ch = grpc.insecure_channel(f"unix://{sock}", options=[("grpc.use_local_subchannel_pool", 1)])
        return pb_grpc.CacheStub(ch)
    for c in range(int(conns)):
        st = stub()
        for s in range(int(streams)):
            req = pb.ReadRangeRequest(snapshot_id=sid, file=pb.FileRange(path=shard, offset=0, length=0),
                                      chunk_size=2 << 20)
            calls.append(st.ReadRange(req, timeout=600))
    st = stub()  # (a connection of their own: the ReadRange ones use every stream slot)
    calls += [st.Ensure(pb.EnsureRequest(model=uri), timeout=600) for _ in range(int(conns))]
    for call in calls:
        next(call)
    print("stalled", flush=True)
    sys.stdin.readline()
    out = []
    for call in calls:
        try:
            for _ in call:
                pass
            out.append(["OK", ""])
        except grpc.RpcError as exc:
            out.append([exc.code().name, exc.details()])
    print(json.dumps(out), flush=True)
""")


@pytest.mark.timeout(900)
def test_stalled_streams_of_one_client_leave_another_clients_open_working(
    tmp_path: Path, big_model: Path, report: Any
) -> None:
    import weightcache

    d = start_daemon(tmp_path / "d", None,
                     limits={"stream_stall_timeout": STALL, "streams_per_connection": STREAMS})  # fmt: skip
    try:
        d.ctl("prefetch", f"file://{big_model}/", "--name", "big")
        manifest = d.ctl_json("show", "big")["manifest"]
        sid = manifest["snapshot_id"]
        shard = next(f["path"] for f in manifest["files"] if f["path"].endswith(".safetensors"))
        pid = d.proc.pid
        fds0 = _fds(pid)
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        # Room for the abuser's connections and a legitimate client, not for a descriptor per stream.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (fds0 + 48, hard))
        abuser = subprocess.Popen(
            [sys.executable, "-c", ABUSE, str(d.socket_dir / "weightcache.sock"), sid, shard, "big",
             str(CONNECTIONS), str(STREAMS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert abuser.stdout is not None and abuser.stdin is not None
            assert abuser.stdout.readline().strip() == "stalled", abuser.stderr.read() if abuser.stderr else ""
            held = _fds(pid) - fds0  # while every stream of the abuser waits for its reader

            # Another client opens and reads the model meanwhile: descriptors over fd.sock, a
            # tensor, and a ReadRange of its own.
            result: dict[str, Any] = {}

            def legit() -> None:
                try:
                    with weightcache.connect(d.socket_dir) as c, c.open("big") as m:
                        name = m.keys()[0]
                        result["tensor"] = tuple(m.get_tensor(name).shape)
                    chunks = _stub(d).ReadRange(
                        pb.ReadRangeRequest(snapshot_id=sid, file=pb.FileRange(path=shard, offset=0, length=1 << 20)),
                        timeout=300,
                    )
                    result["read"] = sum(len(ch.data) for ch in chunks)
                except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                    result["error"] = f"{type(exc).__name__}: {exc}"

            t = threading.Thread(target=legit)
            t.start()
            t.join(240)
            assert not t.is_alive(), "the legitimate client's open() did not complete"
            assert "error" not in result and result["read"] == 1 << 20, result

            # Each stalled stream ends with RESOURCE_EXHAUSTED naming the bound.
            n_read = CONNECTIONS * STREAMS
            wait_for(lambda: d.log_text().count("limits.stream_stall_timeout") >= n_read, 240,
                     "every stalled ReadRange to be closed")  # fmt: skip
            abuser.stdin.write("\n")
            abuser.stdin.flush()
            out = json.loads(abuser.stdout.readline())
            abuser.wait(timeout=120)
        finally:
            abuser.kill()
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        reads = [o for o in out if o[0] != "OK"]
        assert len(reads) >= n_read, out
        assert all(code == "RESOURCE_EXHAUSTED" and "limits.stream_stall_timeout" in msg for code, msg in reads), out
        assert held < n_read // 2, f"{held} descriptors held for {n_read} stalled streams"
        log = d.log_text()
        assert "Traceback" not in log and "Too many open files" not in log
    finally:
        d.stop()
    report(
        "hostile requests",
        f"one process opens {n_read} ReadRange streams of a 16 MiB file on {CONNECTIONS} connections and never "
        f"reads; the daemon's open-file limit leaves room for 48 more descriptors",
        f"another client opens the model and reads meanwhile; the stalled streams end RESOURCE_EXHAUSTED after "
        f"limits.stream_stall_timeout ({STALL:g} s here)",
        f"daemon descriptors while stalled: +{held}",
    )


def test_request_sizes_are_bounded_and_never_echoed_in_full(tmp_path: Path, big_model: Path) -> None:
    limits = ClientLimits()
    d = start_daemon(tmp_path / "d", None)
    try:
        stub = _stub(d)
        uri = f"file://{big_model}/"

        def ensure(**kw: Any) -> grpc.RpcError:
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Ensure(pb.EnsureRequest(**kw), timeout=120))
            return info.value

        cases = [
            ({"model": uri, "include": ["*"] * (limits.globs_max + 1)}, "INVALID_ARGUMENT", "limits.globs_max"),
            ({"model": uri, "exclude": ["x" * (limits.glob_length_max + 1)]}, "INVALID_ARGUMENT",
             "limits.glob_length_max"),
            ({"model": "m" * (limits.reference_length_max + 1)}, "INVALID_ARGUMENT", "limits.reference_length_max"),
            ({"model": uri, "name": "n" * (limits.reference_length_max + 1)}, "INVALID_ARGUMENT",
             "limits.reference_length_max"),
            ({"model": uri, "include": ["y" * 200] * 2000}, "RESOURCE_EXHAUSTED", "larger than max"),
        ]  # fmt: skip
        for kw, code, text in cases:
            err = ensure(**kw)
            assert err.code().name == code and text in (err.details() or ""), (code, text, err.details()[:300])
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ReadRange(pb.ReadRangeRequest(snapshot_id="s" * 5000), timeout=60))
        assert "limits.reference_length_max" in (info.value.details() or "")
        # a list that matches nothing: the error says so without repeating 64 x 250 characters
        nothing = [f"no-such-file-{i:03d}-" + "z" * 230 for i in range(limits.globs_max)]
        err = ensure(model=uri, include=nothing)
        assert err.code().name == "NOT_FOUND" and "no files match" in (err.details() or "")
        assert len(err.details() or "") < 3 * limits.echo_max + 500, len(err.details() or "")
        assert "more characters" in (err.details() or "")
        longest = max(len(line) for line in d.log_text().splitlines())
        assert longest < 4 * limits.echo_max + 2000, longest
        # the daemon still serves a well-formed request
        assert [ev.WhichOneof("event") for ev in stub.Ensure(pb.EnsureRequest(model=uri), timeout=300)][-1] == (
            "manifest"
        )
    finally:
        d.stop()


def test_glob_cache_stays_within_its_size() -> None:
    cache = GlobCache(8)
    for i in range(1000):
        assert cache.match(f"file-{i}.json", f"file-{i}.*")
        assert len(cache) <= 8
    assert not cache.match("a.bin", "*.json") and cache.match("sub/a.json", "*.json")  # fnmatch's rules


def test_limits_are_read_from_the_config(tmp_path: Path) -> None:
    conf = tmp_path / "w.toml"
    conf.write_text('[limits]\nstream_stall_timeout = 5\nread_chunk_max = "2MiB"\nglobs_max = 8\n')
    cfg = load({}, conf, euid=1000)
    assert cfg.limits.stream_stall_timeout == 5.0 and cfg.limits.read_chunk_max == 2 * MiB
    assert cfg.limits.globs_max == 8 and cfg.limits.echo_max == ClientLimits.echo_max
    for bad, text in (('globs_max = 0', "limits.globs_max 0: must be a positive number"),
                      ('nope = 1', "[limits] unknown key(s) nope"),
                      ('read_chunk_max = "1GiB"', "at most 64MiB")):  # fmt: skip
        conf.write_text(f"[limits]\n{bad}\n")
        with pytest.raises(Exception, match=__import__("re").escape(text)):
            load({}, conf, euid=1000)
    assert ClientLimits(echo_max=10).echo(["a" * 50]).endswith("(44 more characters)")  # repr is 54 characters
