"""No writable path to shared bytes, against a real daemon and the kernel's own checks.

Every model is shared by every container on the node, so a descriptor the daemon hands out
must never become a way to write into it, and a file must be committed under the id of the
bytes actually on disk. The attacker here is a separate process that is root with
``CAP_DAC_OVERRIDE`` and nothing else (``setpriv``: Docker's default root keeps that capability
and gets no ``CAP_SYS_ADMIN``); the second case is a writer nobody can stop (the test itself,
root with every capability) writing into a file while it downloads: it must be caught at commit.

Downloads are throttled (download.rate_limit) so they are still going while the attack runs;
every wait is for an observable state, with a generous deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness import Daemon, daemon_argv, make_model, no_partial_files, sha256_file, start_daemon, wait_for, write_config
from tests_helpers import dir_for_others

from weightcache.v1 import weightcache_pb2 as pb
from weightcache.v1 import weightcache_pb2_grpc as pb_grpc

MiB = 1 << 20
CAP_DAC_OVERRIDE = 1

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: capabilities, a read-only mount of the store"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed"),
]

# Runs as root whose capabilities are CAP_DAC_OVERRIDE alone; acquires each snapshot given on
# the command line and tries every writable reopen of every descriptor through /proc/self/fd.
ATTACK = textwrap.dedent("""
    import errno, json, os, sys
    from weightcache._fd import FdConnection
    status = open("/proc/self/status").read()
    eff = int(next(ln for ln in status.splitlines() if ln.startswith("CapEff:")).split()[1], 16)
    out = {"uid": os.geteuid(), "cap_eff": eff, "tries": []}
    with FdConnection(sys.argv[1]) as c:
        for sid in sys.argv[2:]:
            for g in c.acquire(sid):
                for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND):
                    try:
                        os.close(os.open(f"/proc/self/fd/{g.fd}", flags))
                        result = "OPENED"
                    except OSError as exc:
                        result = errno.errorcode[exc.errno]
                    out["tries"].append([sid, g.path, g.sha256, result])
                os.close(g.fd)
    print(json.dumps(out))
""")


def _dac_override_only(argv: list[str]) -> list[str]:
    return ["setpriv", "--bounding-set", "-all,+dac_override", "--inh-caps=-all", *argv]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~24 MiB Llama-shaped model in two shards: long enough to download at a throttled rate."""
    return make_model(tmp_path_factory.mktemp("shared") / "llama", tiny=False, size=24 * MiB, shards=2)


def _slow_daemon(root: Path, rate: str, **cfg: Any) -> Daemon:
    return start_daemon(root, None, download={"rate_limit": rate, "concurrency": 2, "part_size": "1MiB"}, **cfg)


def _early_manifest(d: Daemon, uri: str) -> tuple[Any, pb.Manifest]:
    stub = pb_grpc.CacheStub(grpc.insecure_channel(f"unix://{d.socket_dir}/weightcache.sock"))
    call = stub.Ensure(pb.EnsureRequest(model=uri, early=True), timeout=600)
    for ev in call:
        if ev.WhichOneof("event") == "manifest":
            return call, ev.manifest
    raise AssertionError("Ensure ended without a manifest")


def _doctor(d: Daemon) -> dict[str, Any]:
    """Doctor's checks by name (it exits 1 when any check fails, which other checks may)."""
    return {c["name"]: c for c in json.loads(d.ctl("doctor", "--json", check=False).stdout)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_root_with_dac_override_cannot_reopen_any_descriptor_for_writing(
    tmp_path: Path, model_dir: Path, tiny_model: Path, report: Any
) -> None:
    """Streaming descriptors (ingest files still being written) and committed blobs alike: every
    O_WRONLY / O_RDWR / O_APPEND reopen through /proc/self/fd fails with EROFS, because the daemon
    opened them through a read-only mount of the store; the download itself still commits the
    source's bytes (the daemon writes through its own path)."""
    d = _slow_daemon(tmp_path / "d", "2MiB")
    try:
        d.ctl("prefetch", f"file://{tiny_model}/", "--name", "tiny")
        committed = d.ctl_json("show", "tiny")["manifest"]["snapshot_id"]
        call, early = _early_manifest(d, f"file://{model_dir}/")
        assert early.early
        r = subprocess.run(
            _dac_override_only([sys.executable, "-c", ATTACK, str(d.socket_dir / "fd.sock"), early.snapshot_id,
                                committed]),
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        # The precondition of the attack: the download was still going when it ran.
        assert not [m for m in d.ctl_json("ls") if m["source"].startswith(f"file://{model_dir}")], (
            "the download ended before the attacker ran; the streaming case was not exercised"
        )
        assert out["uid"] == 0 and out["cap_eff"] == 1 << CAP_DAC_OVERRIDE, out
        streaming = [t for t in out["tries"] if t[0] == early.snapshot_id and not t[2]]
        blobs = [t for t in out["tries"] if t[0] == committed]
        assert streaming and blobs, out
        assert {t[3] for t in out["tries"]} == {"EROFS"}, [t for t in out["tries"] if t[3] != "EROFS"]
        final = [ev.manifest for ev in call if ev.WhichOneof("event") == "manifest"]
        assert final and not final[-1].early
        view = Path(final[-1].path)
        for f in final[-1].files:
            assert sha256_file(view / f.path) == sha256_file(model_dir / f.path) == f.sha256
        check = _doctor(d)["read-only descriptors"]
        assert check["status"] == "PASS" and "read-only mount" in check["detail"], check
    finally:
        d.stop()
    report(
        "access",
        "root with only CAP_DAC_OVERRIDE (setpriv) reopens every descriptor of a model still downloading and of a "
        "committed one via /proc/self/fd with O_WRONLY, O_RDWR, O_APPEND",
        "EROFS every time (descriptors opened through a detached read-only mount); the download commits the "
        "source's bytes",
        f"{len(out['tries'])} reopens refused ({len(streaming)} of ingest files)",
    )


def test_a_write_into_a_downloading_file_is_caught_at_commit(tmp_path: Path, model_dir: Path, report: Any) -> None:
    """The harness (root, every capability: it can always write the store) flips one byte of a
    layer-0 tensor after the daemon reported it on disk and a client read it. The commit hashes
    the sealed file from the disk: every open handle gets CorruptedError, nothing is published,
    the event is logged and counted."""
    import weightcache
    from weightcache.errors import CorruptedError
    from weightcache_daemon.ingest.engine import ingest_name

    port = _free_port()
    d = _slow_daemon(tmp_path / "d", "1MiB", metrics_address=f"127.0.0.1:{port}")
    try:
        with weightcache.connect(d.socket_dir) as c1, weightcache.connect(d.socket_dir) as c2:
            m1 = c1.open(f"file://{model_dir}/")
            m2 = c2.open(f"file://{model_dir}/")
            assert m1.manifest.early and m2.manifest.early
            t = next(t for t in m1.manifest.tensors if t.layer_index == 0 and t.file.endswith(".safetensors"))
            before = bytes(m1.get_tensor(t.name).flatten().view(dtype=__import__("torch").uint8).numpy())
            target = next((d.cache_dir / "ingest").glob(f"*/{ingest_name(t.file)}"))
            fd = os.open(target, os.O_WRONLY)
            try:
                os.pwrite(fd, bytes([before[0] ^ 0xFF]), t.offset)
            finally:
                os.close(fd)
            assert not d.ctl_json("ls"), "the download committed before the write; the case was not exercised"
            for m in (m1, m2):
                with pytest.raises(CorruptedError) as info:
                    m.wait_complete(600)
                assert "changed on disk" in str(info.value) and t.file in str(info.value)
                with pytest.raises(CorruptedError):  # and every later call says so
                    m.get_tensor(t.name)
                m.close()
        wait_for(lambda: not d.ctl_json("ls", "--downloads"), 120, "the failed download to end")
        assert d.ctl_json("ls") == [] and int(d.ctl_json("stats")["blobs"]) == 0  # nothing published
        no_partial_files(d)
        assert '"commit_hash_mismatch"' in d.log_text()
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
        assert "weightcache_commit_hash_mismatches_total 1.0" in metrics
    finally:
        d.stop()
    report(
        "streaming",
        "root (the harness) flips one byte of a layer-0 tensor in the ingest file after it was reported on disk "
        "and read by two clients",
        "caught at commit (sha256 read back from the sealed file): CorruptedError on both handles, nothing "
        "published, logged and counted",
    )


def test_without_cap_sys_admin_the_risk_is_reported_or_refused(tmp_path: Path, tiny_model: Path) -> None:
    """A daemon that cannot make the read-only mount keeps working (the developer default) and
    says so in doctor; the residual risk is real (a root client reopens a blob writable); with
    readonly_descriptors = "require" it refuses to start, naming the missing capability."""
    base = dir_for_others("wc-ro-")
    try:
        conf = write_config(tmp_path / "w.toml", None, client_sources=["*"])
        cache, sock, admin = base / "store", base / "sock", base / "admin" / "admin.sock"
        log = base / "daemon.log"
        argv = ["setpriv", "--bounding-set", "-sys_admin", "--inh-caps=-all",
                *daemon_argv(cache, sock, admin, config=conf)]  # fmt: skip
        with open(log, "ab") as lf:
            proc = subprocess.Popen(argv, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        d = Daemon(base, cache, sock, admin, proc, log)
        d.wait_ready()
        try:
            d.ctl("prefetch", f"file://{tiny_model}/", "--name", "tiny")
            sid = d.ctl_json("show", "tiny")["manifest"]["snapshot_id"]
            check = _doctor(d)["read-only descriptors"]
            assert check["status"] == "WARN" and "CAP_SYS_ADMIN" in check["detail"], check
            assert '"descriptors_writable_path"' in d.log_text()
            r = subprocess.run(_dac_override_only([sys.executable, "-c", ATTACK, str(sock / "fd.sock"), sid]),
                               capture_output=True, text=True, timeout=300)  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert {t[3] for t in json.loads(r.stdout)["tries"]} == {"OPENED"}  # the documented residual risk
        finally:
            d.stop()
        strict = write_config(tmp_path / "strict.toml", None, readonly_descriptors="require")
        argv = ["setpriv", "--bounding-set", "-sys_admin", "--inh-caps=-all",
                *daemon_argv(base / "store2", base / "sock2", base / "admin2" / "admin.sock", config=strict)]  # fmt: skip
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert r.returncode != 0
        assert "readonly_descriptors = require" in r.stdout + r.stderr and "CAP_SYS_ADMIN" in r.stdout + r.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_read_only_mount_given_by_the_operator_needs_no_cap_sys_admin(tmp_path: Path, tiny_model: Path) -> None:
    """What the DaemonSet and the systemd unit do: the store mounted a second time, read-only, in
    the daemon's own mount namespace (here: unshare + a read-only bind mount), named by
    readonly_store. The daemon, without CAP_SYS_ADMIN, opens every descriptor through it: EROFS
    for the attacker. A readonly_store that is writable, or another directory, is refused."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    base = dir_for_others("wc-ro-")
    try:
        cache, sock, admin, ro = base / "store", base / "sock", base / "admin" / "admin.sock", base / "store-ro"
        cache.mkdir(mode=0o700)
        ro.mkdir()
        conf = write_config(tmp_path / "w.toml", None, client_sources=["*"], readonly_store=str(ro))
        daemon = " ".join(
            ["exec", "setpriv", "--bounding-set", "-sys_admin", "--inh-caps=-all",
             *daemon_argv(cache, sock, admin, config=conf)]
        )  # fmt: skip
        script = f"mount --bind -o ro {cache} {ro} && {daemon}"
        log = base / "daemon.log"
        with open(log, "ab") as lf:
            proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                    stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
        d = Daemon(base, cache, sock, admin, proc, log)
        d.wait_ready()
        try:
            d.ctl("prefetch", f"file://{tiny_model}/", "--name", "tiny")
            sid = d.ctl_json("show", "tiny")["manifest"]["snapshot_id"]
            check = _doctor(d)["read-only descriptors"]
            assert check["status"] == "PASS" and str(ro) in check["detail"], check
            r = subprocess.run(_dac_override_only([sys.executable, "-c", ATTACK, str(sock / "fd.sock"), sid]),
                               capture_output=True, text=True, timeout=300)  # fmt: skip
            assert r.returncode == 0, r.stderr
            tries = json.loads(r.stdout)["tries"]
            assert tries and {t[3] for t in tries} == {"EROFS"}, tries
        finally:
            d.stop()
        # the store itself (writable) or another directory named as the read-only store: refused
        (base / "s2").mkdir(mode=0o700)
        for named, rule in ((base / "s2", "the mount is writable"), (cache, "not the store's directory")):
            conf = write_config(tmp_path / "bad.toml", None, readonly_store=str(named))
            r = subprocess.run(daemon_argv(base / "s2", base / "k2", base / "a2" / "admin.sock", config=conf),
                               capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
            assert r.returncode != 0 and rule in r.stdout + r.stderr, r.stdout + r.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_download_sealed_for_a_commit_that_a_crash_cut_short_resumes(tmp_path: Path, model_dir: Path) -> None:
    """The daemon dies (SIGKILL) mid-download; its ingest files are left as a seal leaves them
    (0444 and immutable, as with immutable_blobs) when the crash falls between seal and commit.
    The next daemon resumes the download anyway and commits the source's bytes."""
    from weightcache_daemon.storage.blobs import set_immutable

    root = tmp_path / "d"
    d = _slow_daemon(root, "2MiB")
    call, early = _early_manifest(d, f"file://{model_dir}/")
    assert early.early

    def parts_recorded() -> bool:  # the resume record lists parts on disk: the next start resumes
        for state in (d.cache_dir / "ingest").glob("*/state.json"):
            try:
                files = json.loads(state.read_text()).get("files") or []
            except (OSError, ValueError):
                continue
            if any(f.get("written") for f in files):
                return True
        return False

    wait_for(parts_recorded, 300, "the resume record to list parts on disk")
    d.stop(9)
    call.cancel()
    parts = list((d.cache_dir / "ingest").glob("*/*.part"))
    assert parts, "no ingest file to resume"
    for p in parts:
        os.chmod(p, 0o444)
        try:
            set_immutable(p, True)
        except OSError:
            pytest.skip(f"{p}: the filesystem has no FS_IMMUTABLE_FL")
    assert '"fetch_resume"' not in d.log_text()
    d = _slow_daemon(root, "64MiB")
    try:
        wait_for(lambda: bool(d.ctl_json("ls")), 300, "the resumed download to commit")
        assert '"fetch_resume"' in d.log_text()  # resumed from the sealed files, not started over
        view = Path(d.ctl_json("show", d.ctl_json("ls")[0]["name"])["manifest"]["path"])
        for f in model_dir.iterdir():
            assert sha256_file(view / f.name) == sha256_file(f), f.name
        no_partial_files(d)
    finally:
        d.stop()
        for p in parts:  # a failed run must not leave files pytest cannot remove
            if p.exists():
                set_immutable(p, False)
