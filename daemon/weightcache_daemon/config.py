"""Daemon configuration: read once (TOML file, then environment, then flags) into frozen dataclasses.

Nothing else in the daemon reads ``os.environ`` or the config file; the ``Config`` built
here is passed down.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightcache.contract import paths
from weightcache.contract.errors import InvalidInputError
from weightcache_daemon import uris

__all__ = ["ClientLimits", "Config", "DownloadConfig", "SourceConfig", "TenantConfig", "load", "parse_size"]

DEFAULT_INCLUDE = (
    "*.safetensors",
    "*.json",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
    "tokenizer*",
)

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "P": 1000**5,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "PB": 1000**5,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
    "PIB": 1024**5,
}


def parse_size(value: str | int, what: str) -> int:
    """'800G' -> 800e9, '16MiB' -> 16*2**20, 1234 -> 1234."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise InvalidInputError(f"{what}: size {value} is negative")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _UNITS:
        raise InvalidInputError(f"{what}: {value!r} is not a size (examples: 800G, 16MiB, 1073741824)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass(frozen=True)
class SourceConfig:
    """Settings for sources whose URI starts with ``prefix`` (longest prefix wins)."""

    prefix: str
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    profile: str | None = None
    # HTTP(S) proxy for this source, e.g. a Dragonfly dfdaemon proxy in front of the origin.
    proxy: str | None = None
    max_attempts: int = 5
    connect_timeout: float = 10.0
    read_timeout: float = 60.0


@dataclass(frozen=True)
class DownloadConfig:
    concurrency: int = 16  # ranged GETs in flight per job
    part_size: int = 8 * 1024 * 1024  # a multiple of 1 MiB (O_DIRECT alignment)
    rate_limit: int = 0  # bytes/second for the whole daemon; 0 = unlimited
    max_restarts: int = 3  # per file, when the object changes under us (If-Match fails)
    # "layer": parts in layer-group order across all files, so clients can compute while the
    # rest arrives (docs/early.md); "file": file by file, in file order.
    order: str = "layer"


# A tenant name: also a directory name under snapshots/ ("@<name>") and a label in logs.
TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


@dataclass(frozen=True)
class TenantConfig:
    """One tenant (docs/security.md, "Tenants"): a client socket directory and what the
    connections that arrive on it may see and do. Identity is the socket, never the uid.

    ``name`` "" is the default tenant of a node that declares none: it is the shared (admin)
    namespace itself, sees every shared name, and keeps the per-uid bounds of older configs.
    Sizes given as a percentage are kept as such (``*_percent``) and resolved against the
    capacity at start-up (server.py)."""

    name: str
    socket_dir: Path
    client_sources: tuple[str, ...] = ()
    # Shared (admin) model names this tenant may see and use, as globs ("*" = all).
    shared_models: tuple[str, ...] = ()
    socket_group: str | None = None
    lease_quota: int = 0  # bytes of distinct snapshots its connections may lease at once
    lease_quota_percent: float = 0.0
    download_quota: int = 0  # bytes its own names may take in the store (its client downloads)
    download_quota_percent: float = 0.0
    max_downloads: int = 0  # downloads its requests may run at once; 0 = no bound
    max_clients: int = 4096  # fd.sock connections of this tenant, all uids together
    max_names: int = 0  # model names in its own namespace (filter variants count); 0 = no bound

    @property
    def default(self) -> bool:
        return self.name == ""


@dataclass(frozen=True)
class ClientLimits:
    """Bounds on the gRPC client socket (weightcache.sock), per connection, per stream and per
    request; every one is in docs/security.md ("Client socket bounds") with its default. A
    breach is an error for that caller only: RESOURCE_EXHAUSTED or INVALID_ARGUMENT, with a
    message naming the input and the limit. The admin socket is not bounded by these."""

    # Concurrent streams on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS): more wait
    # in the client's transport and cost the daemon nothing.
    streams_per_connection: int = 64
    # Seconds a stream (Ensure, ReadRange) may wait for its reader to take one message; then it
    # ends with RESOURCE_EXHAUSTED, and whatever it held (a model's protection from eviction,
    # a chunk of bytes) is released. A ReadRange stream holds no descriptor while it waits.
    stream_stall_timeout: float = 30.0
    # Largest ReadRange message: one such chunk (plus the transport's window) is what a stream
    # queues for a reader that does not read.
    read_chunk_max: int = 4 << 20
    # Largest request message accepted (gRPC receive limit).
    request_bytes_max: int = 256 << 10
    # include + exclude globs in one request, and the length of each.
    globs_max: int = 64
    glob_length_max: int = 256
    # Model references (names, snapshot ids, URIs) and file paths in a request.
    reference_length_max: int = 1024
    # Compiled include/exclude patterns kept for reuse (least recently used go first).
    glob_cache_size: int = 256
    # Characters of caller-supplied text repeated in one error message or log field.
    echo_max: int = 200
    # Per declared tenant, all its connections together (the default tenant of a node that
    # declares none is not bounded by these): calls in progress (unary and streams), and bytes
    # of ReadRange chunks read for its streams and not yet taken by their readers.
    calls_per_tenant: int = 256
    read_buffer_per_tenant: int = 64 << 20  # the daemon's memory for it is about 5x (copies on the way into gRPC)

    def echo(self, value: object) -> str:
        """`value` as it may be repeated back (repr of a string, lists as lists), cut at
        `echo_max` characters with how much was left out: a request that matches nothing must
        not have its megabytes copied into every log line and error."""
        text = repr(list(value)) if isinstance(value, tuple | list) else repr(value)
        if len(text) <= self.echo_max:
            return text
        return f"{text[: self.echo_max]}… ({len(text) - self.echo_max} more characters)"


@dataclass(frozen=True)
class Config:
    cache_dir: Path
    socket_dir: Path
    admin_socket: Path
    max_size: int = 0  # bytes; 0 = unlimited (or see max_size_percent)
    max_size_percent: float = 0.0  # share of the store's filesystem, resolved at start
    high_watermark: float = 0.95  # evict when usage passes this share of capacity...
    low_watermark: float = 0.85  # ...down to this share
    models_dir: Path | None = None  # declarative models (*.toml), watched
    socket_group: str | None = None  # group owning the client socket dir and sockets
    socket_dir_mode: int = 0o750
    socket_mode: int = 0o660
    admin_group: str | None = None  # when set, the admin socket is 0660 with this group
    max_clients: int = 4096  # open fd.sock connections (leases); more are refused as RESOURCE_EXHAUSTED
    # fd.sock bounds (docs/security.md, "fd.sock bounds"): connections per peer uid, seconds a
    # connection may sit inside a frame, seconds one without leases may sit idle.
    max_clients_per_uid: int = 64
    fd_frame_timeout: float = 10.0
    fd_idle_timeout: float = 60.0
    # Bytes of distinct snapshots one uid may lease at once (0 = no bound), or a share of the
    # capacity (of the store's filesystem when the capacity is unlimited).
    lease_quota: int = 0
    lease_quota_percent: float = 50.0
    # Set FS_IMMUTABLE_FL on committed blobs (needs CAP_LINUX_IMMUTABLE): not even root in a
    # container can open a granted descriptor for writing (docs/security.md).
    immutable_blobs: bool = False
    # Open every descriptor handed to a client through a detached read-only mount of the store,
    # so not even root with CAP_DAC_OVERRIDE can reopen it for writing (docs/security.md, "No
    # writable path to shared bytes"): "auto" when the daemon may (CAP_SYS_ADMIN), "require"
    # (refuse to start without), "off".
    readonly_descriptors: str = "auto"
    # A read-only mount of cache_dir made for the daemon (a readOnly volumeMount of the same
    # hostPath, systemd BindReadOnlyPaths=): descriptors are opened through it, no CAP_SYS_ADMIN needed.
    readonly_store: Path | None = None
    log_format: str = "console"
    metrics_address: str | None = None
    client_sources: tuple[str, ...] = ()
    include: tuple[str, ...] = DEFAULT_INCLUDE
    download: DownloadConfig = field(default_factory=DownloadConfig)
    limits: ClientLimits = field(default_factory=ClientLimits)
    sources: tuple[SourceConfig, ...] = ()
    system: bool = False
    config_file: Path | None = None
    # Declared tenants; none declared means one default tenant on socket_dir (tenants()).
    declared_tenants: tuple[TenantConfig, ...] = ()

    def tenants(self) -> tuple[TenantConfig, ...]:
        """Every tenant whose sockets the daemon binds: the declared ones, or the default one
        (socket_dir, client_sources, every shared name, per-uid bounds as before tenants)."""
        if self.declared_tenants:
            return self.declared_tenants
        return (
            TenantConfig(
                name="",
                socket_dir=self.socket_dir,
                client_sources=self.client_sources,
                shared_models=("*",),
                socket_group=self.socket_group,
                max_clients=self.max_clients,
            ),
        )

    def source_for(self, uri: str) -> SourceConfig:
        best = SourceConfig(prefix="")
        for s in self.sources:
            if uri.startswith(s.prefix) and len(s.prefix) >= len(best.prefix):
                best = s
        return best

    def client_may_fetch(self, uri: str) -> bool:
        """Whether a client may trigger a download of ``uri``: the allow-list is matched against
        the canonical form only (uris.normalize), so '..', encodings and duplicate slashes
        cannot step out of an allowed prefix; a URI that does not normalise is never allowed."""
        try:
            canonical = uris.normalize(uri)
        except InvalidInputError:
            return False
        return uris.allowed(canonical, self.client_sources)


def capacity_bytes(cfg: Config) -> int:
    """The capacity in bytes: max_size, or max_size_percent of the store's filesystem; 0 = unlimited."""
    if cfg.max_size_percent:
        cfg.cache_dir.mkdir(parents=True, exist_ok=True)
        st = os.statvfs(cfg.cache_dir)
        return int(st.f_blocks * st.f_frsize * cfg.max_size_percent / 100)
    return cfg.max_size


_TOP_KEYS = {
    "cache_dir",
    "socket_dir",
    "admin_socket",
    "max_size",
    "high_watermark",
    "low_watermark",
    "models_dir",
    "socket_group",
    "socket_dir_mode",
    "socket_mode",
    "admin_group",
    "max_clients",
    "max_clients_per_uid",
    "fd_frame_timeout",
    "fd_idle_timeout",
    "lease_quota",
    "immutable_blobs",
    "readonly_descriptors",
    "readonly_store",
    "log_format",
    "metrics_address",
    "client_sources",
    "include",
    "download",
    "limits",
    "sources",
    "tenants",
}

_TENANT_KEYS = {
    "name",
    "socket_dir",
    "client_sources",
    "shared_models",
    "socket_group",
    "lease_quota",
    "download_quota",
    "max_downloads",
    "max_clients",
    "max_names",
}
DEFAULT_TENANT_LEASE_QUOTA = "25%"
DEFAULT_TENANT_DOWNLOAD_QUOTA = "25%"
DEFAULT_TENANT_MAX_DOWNLOADS = 2
DEFAULT_TENANT_MAX_CLIENTS = 256
DEFAULT_TENANT_MAX_NAMES = 256


def _size_or_percent(raw: Any, what: str) -> tuple[int, float]:
    """'25%' -> (0, 25.0); '200G' or 1234 -> (bytes, 0.0)."""
    if isinstance(raw, str) and raw.strip().endswith("%"):
        try:
            percent = float(raw.strip()[:-1])
        except ValueError:
            percent = -1
        if not 0 < percent <= 100:
            raise InvalidInputError(f"{what} {raw!r}: a percentage must be in (0, 100]")
        return 0, percent
    return parse_size(raw, what), 0.0


def _str_list(raw: Any, what: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        raise InvalidInputError(f"{what}: must be a list of strings")
    return tuple(raw)


def _tenants(raw: Any, where: str, admin_socket: Path, default_group: str | None) -> tuple[TenantConfig, ...]:
    """[[tenants]] entries: each a name, its own socket directory, and its bounds."""
    if not isinstance(raw, list):
        raise InvalidInputError(f"{where}: tenants must be an array of tables ([[tenants]])")
    out: list[TenantConfig] = []
    for i, item in enumerate(raw):
        w = f"{where}: tenants[{i}]"
        if not isinstance(item, dict):
            raise InvalidInputError(f"{w}: must be a table")
        extra = set(item) - _TENANT_KEYS
        if extra:
            raise InvalidInputError(f"{w}: unknown key(s) {', '.join(sorted(extra))}")
        name = item.get("name")
        if not isinstance(name, str) or not TENANT_NAME.fullmatch(name):
            raise InvalidInputError(
                f"{w}: name {name!r} must be 1-63 of a-z, 0-9, '-', starting with a letter or digit"
            )
        w = f"{where}: tenant {name!r}"
        if not isinstance(item.get("socket_dir"), str) or not item["socket_dir"]:
            raise InvalidInputError(f"{w}: needs socket_dir, the client socket directory its pods mount")
        socket_dir = Path(item["socket_dir"]).absolute()
        if admin_socket.parent.resolve().is_relative_to(socket_dir.resolve()):
            raise InvalidInputError(f"{w}: socket_dir {socket_dir} must not contain the admin socket {admin_socket}")
        sources = tuple(
            uris.check_pattern(p, w) for p in _str_list(item.get("client_sources", []), f"{w}: client_sources")
        )
        shared = _str_list(item.get("shared_models", []), f"{w}: shared_models")
        group = item.get("socket_group", default_group)
        if group is not None and not isinstance(group, str | int):
            raise InvalidInputError(f"{w}: socket_group must be a group name or gid")
        lease, lease_pct = _size_or_percent(item.get("lease_quota", DEFAULT_TENANT_LEASE_QUOTA), f"{w}: lease_quota")
        dl, dl_pct = _size_or_percent(item.get("download_quota", DEFAULT_TENANT_DOWNLOAD_QUOTA), f"{w}: download_quota")
        counts = {}
        for key, default in (
            ("max_downloads", DEFAULT_TENANT_MAX_DOWNLOADS),
            ("max_clients", DEFAULT_TENANT_MAX_CLIENTS),
            ("max_names", DEFAULT_TENANT_MAX_NAMES),
        ):
            v = item.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidInputError(f"{w}: {key} {v!r} must be a whole number >= 1")
            counts[key] = v
        out.append(
            TenantConfig(
                name=name,
                socket_dir=socket_dir,
                client_sources=sources,
                shared_models=shared,
                socket_group=str(group) if group is not None else None,
                lease_quota=lease,
                lease_quota_percent=lease_pct,
                download_quota=dl,
                download_quota_percent=dl_pct,
                max_downloads=counts["max_downloads"],
                max_clients=counts["max_clients"],
                max_names=counts["max_names"],
            )
        )
    names = [t.name for t in out]
    dirs = [t.socket_dir.resolve() for t in out]
    for what, values in (("name", names), ("socket_dir", [str(d) for d in dirs])):
        dup = {v for v in values if values.count(v) > 1}
        if dup:
            raise InvalidInputError(f"{where}: tenants share a {what} ({', '.join(sorted(dup))}); each needs its own")
    for a in dirs:
        for b in dirs:
            if a != b and a.is_relative_to(b):
                raise InvalidInputError(f"{where}: tenant socket_dir {a} is inside another tenant's {b}")
    return tuple(out)


def _limits(raw: Any, where: str) -> ClientLimits:
    """[limits]: each a positive number (sizes may be written 4MiB)."""
    if not isinstance(raw, dict):
        raise InvalidInputError(f"{where}: [limits] must be a table")
    extra = set(raw) - set(ClientLimits.__dataclass_fields__)
    if extra:
        raise InvalidInputError(f"{where}: [limits] unknown key(s) {', '.join(sorted(extra))}")
    values: dict[str, Any] = {}
    for key, f in ClientLimits.__dataclass_fields__.items():
        v = raw.get(key, f.default)
        if key in ("read_chunk_max", "request_bytes_max", "read_buffer_per_tenant") and isinstance(v, str):
            v = parse_size(v, f"limits.{key}")
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
            raise InvalidInputError(f"limits.{key} {v!r}: must be a positive number")
        values[key] = float(v) if key == "stream_stall_timeout" else int(v)
    if values["read_chunk_max"] > 64 << 20:
        raise InvalidInputError(f"limits.read_chunk_max {values['read_chunk_max']}: at most 64MiB (one gRPC message)")
    return ClientLimits(**values)


def _sources(raw: Any, where: str) -> tuple[SourceConfig, ...]:
    if not isinstance(raw, list):
        raise InvalidInputError(f"{where}: sources must be an array of tables ([[sources]])")
    out = []
    allowed = set(SourceConfig.__dataclass_fields__)
    for i, item in enumerate(raw):
        w = f"{where}: sources[{i}]"
        if not isinstance(item, dict) or "prefix" not in item:
            raise InvalidInputError(f"{w}: needs a prefix")
        extra = set(item) - allowed
        if extra:
            raise InvalidInputError(f"{w}: unknown key(s) {', '.join(sorted(extra))}")
        out.append(SourceConfig(**item))
    return tuple(out)


def load(
    env: Mapping[str, str],
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    euid: int | None = None,
) -> Config:
    """Build the Config: defaults < TOML file < WEIGHTCACHE_* environment < flags."""
    euid = os.geteuid() if euid is None else euid
    system = euid == 0
    if config_file is None and env.get("WEIGHTCACHE_CONFIG"):
        config_file = Path(env["WEIGHTCACHE_CONFIG"])
    data = _layers(env, config_file, overrides)
    where = str(config_file)
    cache_dir, socket_dir, admin_socket = _paths(data, env, system)
    client_sources = _client_sources(data, config_file)
    log_format = str(data.get("log_format", "json" if env.get("JOURNAL_STREAM") else "console"))
    if log_format not in ("json", "console"):
        raise InvalidInputError(f"log_format {log_format!r}: must be 'json' or 'console'")
    download = _download(data, where)
    include = data.get("include", list(DEFAULT_INCLUDE))
    if not isinstance(include, list) or not all(isinstance(s, str) for s in include):
        raise InvalidInputError(f"{where}: include must be a list of globs")
    percent, high, low = _capacity(data)
    if "models_dir" in data:
        models_dir: Path | None = Path(data["models_dir"])
    elif config_file is not None:
        models_dir = config_file.parent / "models.d"
    else:
        models_dir = None
    modes = _socket_modes(data)
    metrics = data.get("metrics_address", "127.0.0.1:9464" if system and config_file is not None else None)
    fd_bounds = _fd_bounds(data)
    quota, quota_percent = _lease_quota(data)
    immutable = data.get("immutable_blobs", False)
    if not isinstance(immutable, bool):
        raise InvalidInputError(f"immutable_blobs {immutable!r}: must be true or false")
    readonly = data.get("readonly_descriptors", Config.readonly_descriptors)
    if readonly not in ("auto", "require", "off"):
        raise InvalidInputError(f'readonly_descriptors {readonly!r}: must be "auto", "require" or "off"')
    return Config(
        cache_dir=cache_dir,
        socket_dir=socket_dir,
        admin_socket=admin_socket,
        max_size=0 if percent else parse_size(data.get("max_size", 0), "max_size"),
        max_size_percent=percent,
        high_watermark=high,
        low_watermark=low,
        models_dir=models_dir,
        log_format=log_format,
        metrics_address=str(metrics) if metrics else None,
        socket_group=str(data["socket_group"]) if "socket_group" in data else None,
        socket_dir_mode=modes["socket_dir_mode"],
        socket_mode=modes["socket_mode"],
        admin_group=str(data["admin_group"]) if "admin_group" in data else None,
        max_clients=int(fd_bounds["max_clients"]),
        max_clients_per_uid=int(fd_bounds["max_clients_per_uid"]),
        fd_frame_timeout=float(fd_bounds["fd_frame_timeout"]),
        fd_idle_timeout=float(fd_bounds["fd_idle_timeout"]),
        lease_quota=quota,
        lease_quota_percent=quota_percent,
        immutable_blobs=immutable,
        readonly_descriptors=str(readonly),
        readonly_store=Path(data["readonly_store"]).absolute() if data.get("readonly_store") else None,
        client_sources=client_sources,
        include=tuple(include),
        download=download,
        limits=_limits(data.get("limits", {}), where),
        sources=_sources(data.get("sources", []), where),
        system=system,
        config_file=config_file,
        declared_tenants=_tenants(
            data.get("tenants", []),
            where,
            admin_socket,
            str(data["socket_group"]) if "socket_group" in data else None,
        ),
    )


def _layers(env: Mapping[str, str], config_file: Path | None, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The TOML file's keys, then WEIGHTCACHE_* variables over them, then flags over those."""
    data: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = tomllib.loads(config_file.read_text())
        except FileNotFoundError:
            raise InvalidInputError(f"config file {config_file} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInputError(f"config file {config_file}: {exc}") from None
        unknown = set(data) - _TOP_KEYS
        if unknown:
            raise InvalidInputError(f"{config_file}: unknown key(s) {', '.join(sorted(unknown))}")
    for key, var in (
        ("cache_dir", "WEIGHTCACHE_CACHE_DIR"),
        ("socket_dir", "WEIGHTCACHE_SOCKET_DIR"),
        ("admin_socket", "WEIGHTCACHE_ADMIN_SOCKET"),
        ("max_size", "WEIGHTCACHE_MAX_SIZE"),
        ("log_format", "WEIGHTCACHE_LOG_FORMAT"),
    ):
        if env.get(var):
            data[key] = env[var]
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    return data


def _paths(data: dict[str, Any], env: Mapping[str, str], system: bool) -> tuple[Path, Path, Path]:
    """Store, client socket directory and admin socket: given, else the system or user default."""
    cache_dir = (
        Path(data["cache_dir"])
        if "cache_dir" in data
        else (paths.SYSTEM_CACHE_DIR if system else paths.user_cache_dir(env))
    )
    socket_dir = (
        Path(data["socket_dir"])
        if "socket_dir" in data
        else (paths.SYSTEM_SOCKET_DIR if system else paths.user_socket_dir(env))
    )
    admin_socket = (
        Path(data["admin_socket"])
        if "admin_socket" in data
        else (paths.SYSTEM_ADMIN_SOCKET if system else paths.user_admin_socket(env))
    )
    # Absolute from here on: gRPC reads "unix://rel/x.sock" as a host name, and a daemon that
    # later changes directory must still find its own store.
    cache_dir, socket_dir, admin_socket = cache_dir.absolute(), socket_dir.absolute(), admin_socket.absolute()
    if admin_socket.parent.resolve().is_relative_to(socket_dir.resolve()):
        raise InvalidInputError(
            f"admin socket {admin_socket} must not be inside the client socket directory {socket_dir} "
            "(containers mount that directory)"
        )
    return cache_dir, socket_dir, admin_socket


def _client_sources(data: dict[str, Any], config_file: Path | None) -> tuple[str, ...]:
    # Decision 7: a developer daemon without a config file serves its own user, so clients
    # may fetch anything; a configured daemon allows only what the config lists.
    if "client_sources" not in data:
        return () if config_file is not None else ("*",)
    where = str(config_file)
    cs = data["client_sources"]
    if not isinstance(cs, list) or not all(isinstance(s, str) for s in cs):
        raise InvalidInputError(f"{where}: client_sources must be a list of URI glob patterns")
    return tuple(uris.check_pattern(p, where) for p in cs)


def _download(data: dict[str, Any], where: str) -> DownloadConfig:
    dl_raw = data.get("download", {})
    if not isinstance(dl_raw, dict):
        raise InvalidInputError(f"{where}: [download] must be a table")
    extra = set(dl_raw) - set(DownloadConfig.__dataclass_fields__)
    if extra:
        raise InvalidInputError(f"{where}: [download] unknown key(s) {', '.join(sorted(extra))}")
    download = DownloadConfig(
        concurrency=int(dl_raw.get("concurrency", DownloadConfig.concurrency)),
        part_size=parse_size(dl_raw.get("part_size", DownloadConfig.part_size), "download.part_size"),
        rate_limit=parse_size(dl_raw.get("rate_limit", 0), "download.rate_limit"),
        max_restarts=int(dl_raw.get("max_restarts", DownloadConfig.max_restarts)),
        order=str(dl_raw.get("order", DownloadConfig.order)),
    )
    if download.order not in ("layer", "file"):
        raise InvalidInputError(f'download.order {download.order!r}: must be "layer" or "file"')
    if not 1 <= download.concurrency <= 256:
        raise InvalidInputError(f"download.concurrency {download.concurrency}: must be 1..256")
    if download.part_size < 1 << 20 or download.part_size % (1 << 20) or download.part_size > 1 << 30:
        raise InvalidInputError(f"download.part_size {download.part_size}: must be a whole number of MiB, 1MiB..1GiB")
    return download


def _capacity(data: dict[str, Any]) -> tuple[float, float, float]:
    """max_size as a percentage of the filesystem (0 when given in bytes), and the watermarks."""
    percent = 0.0
    raw_max = data.get("max_size", 0)
    if isinstance(raw_max, str) and raw_max.strip().endswith("%"):
        try:
            percent = float(raw_max.strip()[:-1])
        except ValueError:
            percent = -1
        if not 0 < percent <= 100:
            raise InvalidInputError(f"max_size {raw_max!r}: a percentage must be in (0, 100]")
    high = float(data.get("high_watermark", 0.95))
    low = float(data.get("low_watermark", 0.85))
    if not 0 < low < high <= 1:
        raise InvalidInputError(f"watermarks: need 0 < low_watermark ({low}) < high_watermark ({high}) <= 1")
    return percent, high, low


def _socket_modes(data: dict[str, Any]) -> dict[str, int]:
    modes = {}
    for key, default in (("socket_dir_mode", 0o750), ("socket_mode", 0o660)):
        raw = data.get(key, default)
        try:
            modes[key] = int(raw, 8) if isinstance(raw, str) else int(raw)
        except ValueError:
            raise InvalidInputError(f'{key} {raw!r}: an octal mode such as "0750"') from None
        if not 0 <= modes[key] <= 0o777 or modes[key] & 0o007:
            raise InvalidInputError(f"{key} {oct(modes[key])}: must grant nothing to others (o=---)")
    if modes["socket_dir_mode"] & 0o020:
        # group write on the directory lets any client replace the daemon's sockets with its own
        raise InvalidInputError(f"socket_dir_mode {oct(modes['socket_dir_mode'])}: must not let the group write (g-w)")
    for key in ("socket_group", "admin_group"):
        if key in data and not isinstance(data[key], str | int):
            raise InvalidInputError(f"{key}: a group name or gid")
    return modes


def _fd_bounds(data: dict[str, Any]) -> dict[str, int | float]:
    fd_bounds = {}
    for key, lo in (
        ("max_clients", 1),
        ("max_clients_per_uid", 1),
        ("fd_frame_timeout", 0.1),
        ("fd_idle_timeout", 0.1),
    ):
        raw = data.get(key, getattr(Config, key))
        if isinstance(raw, bool) or not isinstance(raw, int | float) or raw < lo:
            raise InvalidInputError(f"{key} {raw!r}: must be a number >= {lo}")
        fd_bounds[key] = raw
    return fd_bounds


def _lease_quota(data: dict[str, Any]) -> tuple[int, float]:
    """lease_quota in bytes, or as a percentage of the capacity."""
    quota_raw = data.get("lease_quota", "50%")
    quota, quota_percent = 0, 0.0
    if isinstance(quota_raw, str) and quota_raw.strip().endswith("%"):
        try:
            quota_percent = float(quota_raw.strip()[:-1])
        except ValueError:
            quota_percent = -1
        if not 0 < quota_percent <= 100:
            raise InvalidInputError(f"lease_quota {quota_raw!r}: a percentage must be in (0, 100]")
    else:
        quota = parse_size(quota_raw, "lease_quota")
    return quota, quota_percent
