"""Configuration loading and the source path rules (pure functions, no daemon)."""

from __future__ import annotations

from pathlib import Path

import pytest

from weightcache.errors import InvalidInputError, NotFoundError
from weightcache_daemon import config
from weightcache_daemon.ingest.pipeline import select, snapshot_id_of
from weightcache_daemon.sources import RemoteObject, check_relpath, parse_uri
from weightcache_daemon.sources.local import LocalSource


def test_user_defaults_follow_xdg(tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "c"), "XDG_RUNTIME_DIR": str(tmp_path / "r"), "HOME": str(tmp_path)}
    cfg = config.load(env, euid=1000)
    assert cfg.cache_dir == tmp_path / "c" / "weightcache"
    assert cfg.socket_dir == tmp_path / "r" / "weightcache" / "client"
    assert cfg.admin_socket == tmp_path / "r" / "weightcache" / "admin.sock"
    assert cfg.client_sources == ("*",) and cfg.client_may_fetch("s3://any/thing/")


def test_system_defaults_for_root() -> None:
    cfg = config.load({}, euid=0)
    assert str(cfg.cache_dir) == "/var/lib/weightcache" and str(cfg.socket_dir) == "/run/weightcache/client"


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    f = tmp_path / "w.toml"
    f.write_text(
        'cache_dir = "/from/file"\nmax_size = "800G"\nclient_sources = ["s3://ok/*"]\n'
        '[download]\npart_size = "8MiB"\n[[sources]]\nprefix = "s3://ok/"\nproxy = "http://127.0.0.1:65001"\n'
    )
    cfg = config.load({"WEIGHTCACHE_CACHE_DIR": "/from/env"}, f, {"max_size": "1GiB"}, euid=1000)
    assert cfg.cache_dir == Path("/from/env") and cfg.max_size == 2**30
    assert cfg.download.part_size == 8 << 20
    assert cfg.source_for("s3://ok/model/").proxy == "http://127.0.0.1:65001"
    assert cfg.source_for("s3://other/").proxy is None
    assert cfg.client_may_fetch("s3://ok/m/") and not cfg.client_may_fetch("s3://nope/m/")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus = 1", "unknown key(s) bogus"),
        ("max_size = 'lots'", "is not a size"),
        ("[download]\nspeed = 1", "[download] unknown key(s) speed"),
        ("[download]\norder = 'random'", 'download.order \'random\': must be "layer" or "file"'),
        ("[[sources]]\nendpoint_url = 'x'", "needs a prefix"),
        ("client_sources = 's3://x'", "client_sources must be a list"),
        ("cache_dir = ", "w.toml"),
    ],
)
def test_bad_config_names_the_rule(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "w.toml"
    f.write_text(text + "\n")
    with pytest.raises(InvalidInputError) as exc:
        config.load({}, f, euid=1000)
    assert message in str(exc.value)


def test_admin_socket_may_not_sit_in_the_client_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="must not be inside the client socket directory"):
        config.load({}, None, {"socket_dir": tmp_path, "admin_socket": tmp_path / "admin.sock"}, euid=1000)


@pytest.mark.parametrize("bad", ["../x", "a/../../b", "/etc/passwd", "a//b", "./a", "a/./b", "", "a\\b", "a/\x00"])
def test_escaping_object_names_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInputError, match="object name"):
        check_relpath(bad, "s3://b/p/")


def test_uri_parsing() -> None:
    assert parse_uri("s3://bucket/a/b/") == ("s3", "bucket", "a/b/")
    assert parse_uri("file:///data/m/") == ("file", "", "/data/m/")
    with pytest.raises(InvalidInputError, match="not a URI"):
        parse_uri("/data/m")


def test_select_and_snapshot_id() -> None:
    objs = [RemoteObject(p, 1, "v", "u/" + p) for p in ["a.safetensors", "sub/b.safetensors", "x.bin", "config.json"]]
    assert [o.relpath for o in select(objs, ("*.safetensors",), ())] == ["a.safetensors", "sub/b.safetensors"]
    assert [o.relpath for o in select(objs, ("*",), ("*.bin",))] == [
        "a.safetensors",
        "sub/b.safetensors",
        "config.json",
    ]
    assert snapshot_id_of([("a", "1"), ("b", "2")]) == snapshot_id_of([("b", "2"), ("a", "1")])
    assert snapshot_id_of([("a", "1")]) != snapshot_id_of([("a", "2")])


def test_local_source_lists_regular_files_and_detects_change(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(b"abc")
    (tmp_path / ".hidden").write_text("x")
    src = LocalSource(f"file://{tmp_path}/")
    [obj] = src.list()
    assert obj.relpath == "sub/w.bin" and obj.size == 3
    buf = bytearray(2)
    landed: list[int] = []
    src.read_into(obj, 1, memoryview(buf), landed.append)
    assert bytes(buf) == b"bc" and sum(landed) == 2
    (tmp_path / "sub" / "w.bin").write_bytes(b"abcd")
    from weightcache_daemon.sources import ObjectChanged

    with pytest.raises(ObjectChanged):
        src.read_into(obj, 0, memoryview(bytearray(3)), landed.append)
    with pytest.raises(NotFoundError):
        LocalSource(f"file://{tmp_path}/missing/").list()
