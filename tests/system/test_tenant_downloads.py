"""A download is its tenant's own (docs/security.md, "Tenants"): two tenants asking for the
same source never share a job (its name, quota and errors are its starter's), a manifest names
the source its tenant knows, and a tenant's max_downloads counts its jobs until they end, however
soon its requests go away.

A real daemon with two declared tenants, on a throttled source (download.rate_limit) so that a
download is observably running while the other tenant acts from its own process and uid.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import upload_dir, wait_for
from test_tenants import _model, as_tenant, tenant_daemon
from tests_helpers import dir_for_others

from weightcache import ExhaustedError, WeightcacheError, connect

RATE = {"rate_limit": "1MiB"}  # an 8 MiB model downloads for about 8 s: seen running, observably


@pytest.fixture
def root() -> Iterator[Path]:
    d = dir_for_others("wc-tenant-dl-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _downloads(d: Any) -> list[str]:
    return [x["name"] for x in d.ctl_json("ls", "--downloads")]


def test_a_tenant_never_joins_another_tenants_download(root: Path, s3, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Every job slot is taken by slow downloads, so tenant a's download of a popular model waits
    # for a slot, observably, while tenant b asks for the same model.
    fillers = [_model(s3, bucket, tmp_path, f"filler{i}", seed=50 + i, size=4 << 20) for i in range(7)]
    a_filler = _model(s3, bucket, tmp_path, "a-filler", seed=60, size=2 << 20)
    popular = _model(s3, bucket, tmp_path, "popular", seed=61, size=4 << 20)
    d, sock_a, sock_b = tenant_daemon(root, s3, bucket, download={"rate_limit": "4MiB"},
                                      a={"download_quota": "3MiB", "max_downloads": 8}, b={"max_downloads": 8})  # fmt: skip
    got: dict[str, Any] = {}

    def fetch(sock: Path, uri: str, name: str) -> None:
        with connect(sock) as c:
            try:
                got[name] = c.ensure(uri, name=name).snapshot_id
            except WeightcacheError as exc:
                got[name] = exc

    threads = [threading.Thread(target=fetch, args=(sock_b, u, f"filler{i}")) for i, u in enumerate(fillers)]
    threads.append(threading.Thread(target=fetch, args=(sock_a, a_filler, "a-filler")))
    try:
        for t in threads:
            t.start()
        wait_for(lambda: len(_downloads(d)) == 8, 120, "eight downloads to be running")
        secret = threading.Thread(target=fetch, args=(sock_a, popular, "project-x-secret"))
        threads.append(secret)
        secret.start()
        wait_for(lambda: "a:project-x-secret" in _downloads(d), 120, "tenant a's download to wait for a slot")
        code = """
sock, uri = sys.argv[1:]
with connect(sock) as c:
    print(json.dumps(outcome(lambda: c.ensure(uri, name="mine").snapshot_id)))
"""
        seen = as_tenant(2001, code, str(sock_b), popular)
        for t in threads:
            t.join(timeout=600)
        # a's download is refused by a's quota; b, with none, has its own and gets the model
        assert isinstance(got["project-x-secret"], ExhaustedError), got
        assert "ok" in seen, seen
        assert "b:mine" in [m["name"] for m in d.ctl_json("ls")]
    finally:
        d.stop()


def test_a_manifest_names_the_source_its_tenant_asked_for(root: Path, s3, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    private = _model(s3, bucket, tmp_path, "project-x-secret-finetune", seed=41)
    upload_dir(s3, bucket, "my-copy/", tmp_path / "project-x-secret-finetune")  # the same bytes, elsewhere
    mine = f"s3://{bucket}/my-copy/"
    d, sock_a, sock_b = tenant_daemon(root, s3, bucket)
    try:
        with connect(sock_a) as a:
            ma = a.ensure(private, name="private")
        code = """
sock, uri = sys.argv[1:]
with connect(sock) as c:
    m = c.ensure(uri, name="mine")
    again = c.ensure("mine")
    by_id = c.ensure(m.snapshot_id)
    print(json.dumps({"sid": m.snapshot_id, "sources": [m.source, again.source, by_id.source],
                      "list": [x.source for x in c.list()]}))
"""
        seen = as_tenant(2001, code, str(sock_b), mine)
        assert seen["sid"] == ma.snapshot_id  # the bytes are shared by content ...
        assert seen["sources"] == [mine, mine, mine], seen  # ... the source is b's own
        assert seen["list"] == [mine], seen
    finally:
        d.stop()


def test_max_downloads_counts_jobs_until_they_end(root: Path, s3, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = _model(s3, bucket, tmp_path, "first", seed=42, size=8 << 20)
    second = _model(s3, bucket, tmp_path, "second", seed=43)
    d, _, sock_b = tenant_daemon(root, s3, bucket, download=RATE, b={"max_downloads": 1})
    try:
        # b starts a download and goes away at its first answer: the download goes on ...
        code = """
sock, uri = sys.argv[1:]
from weightcache.v1 import weightcache_pb2 as pb, weightcache_pb2_grpc as pb_grpc
stub = pb_grpc.CacheStub(grpc.insecure_channel("unix://" + sock + "/weightcache.sock"))
call = stub.Ensure(pb.EnsureRequest(model=uri, name="first"))
next(call)
call.cancel()
print(json.dumps("cancelled"))
"""
        assert as_tenant(2001, code, str(sock_b), first) == "cancelled"
        assert "b:first" in _downloads(d)
        # ... and still counts: its next download is refused while the first one runs
        code = """
sock, uri = sys.argv[1:]
with connect(sock) as c:
    print(json.dumps(outcome(lambda: c.ensure(uri, name="second").snapshot_id)))
"""
        refused = as_tenant(2001, code, str(sock_b), second)
        if "b:first" in _downloads(d):  # the answer came while the first download was running
            assert refused.get("error") == "ExhaustedError", refused
            assert "max_downloads is 1" in refused["message"], refused
        wait_for(lambda: not _downloads(d), 300, "b's first download to end")
        assert "ok" in as_tenant(2001, code, str(sock_b), second)
        assert sorted(m["name"] for m in d.ctl_json("ls")) == ["b:first", "b:second"]
    finally:
        d.stop()


def test_a_tenant_has_at_most_max_names_names(root: Path, s3, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    uri = _model(s3, bucket, tmp_path, "variants", seed=44)
    d, _, sock_b = tenant_daemon(root, s3, bucket, b={"max_names": 2})
    try:
        code = """
sock, uri = sys.argv[1:]
with connect(sock) as c:
    out = [outcome(lambda inc=inc: c.ensure(uri, include=["*.safetensors", inc]).name) for inc in ("*.json", "x*", "y*")]
    out.append(outcome(lambda: c.ensure(out[0]["ok"]).name))  # a name it has still answers
print(json.dumps(out))
"""
        first, second, third, again = as_tenant(2001, code, str(sock_b), uri)
        assert "ok" in first and "ok" in second, (first, second)
        assert third.get("error") == "ExhaustedError" and "max_names is 2" in third["message"], third
        assert again == first
        assert len(d.ctl_json("ls")) == 2
    finally:
        d.stop()
