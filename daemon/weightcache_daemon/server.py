"""Assembling the daemon: store, index, core, the three sockets.

``create_daemon(cfg)`` builds everything without serving; ``Daemon.start()`` binds the
sockets; ``serve(cfg)`` runs until SIGTERM/SIGINT. Tests start a real daemon on temp
sockets through the same code.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from weightcache.contract import paths
from weightcache.contract.errors import BusyError, CorruptedError, InvalidInputError, PermissionDeniedError
from weightcache.v1 import weightcache_pb2_grpc as pb_grpc
from weightcache_daemon.cache.assembly import build_core
from weightcache_daemon.cache.declarative import ModelsDir
from weightcache_daemon.cache.leases import Leases
from weightcache_daemon.cache.reconcile import reconcile
from weightcache_daemon.config import Config, TenantConfig, capacity_bytes
from weightcache_daemon.edges.fdserver import FdServer, raise_nofile_limit
from weightcache_daemon.edges.handlers import AdminService, CacheService
from weightcache_daemon.observe import taskdump
from weightcache_daemon.observe.metrics import Metrics
from weightcache_daemon.records import ClientSockets
from weightcache_daemon.storage.blobs import BlobStore, LocalBlobStore, StoreLock
from weightcache_daemon.storage.index import Index

log = structlog.get_logger("weightcached")
CLIENT_WARMUP_SECONDS = 10.0  # at most this long for the S3 clients before reporting ready

MAX_MESSAGE = 64 << 20
ADMIN_SOCKET_MODE = 0o600
USE_FLUSH_SECONDS = 5.0


def _claim_socket(path: Path) -> None:
    """Remove a stale socket file; refuse if a live daemon answers on it."""
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise BusyError(f"socket {path} is in use by another process (is another weightcached running?)")


def unlink_if_same(path: Path, inode: int) -> None:
    """Unlink a socket this process bound, unless another file has taken its path since."""
    try:
        if os.stat(path, follow_symlinks=False).st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass


def resolve_group(group: str | None, what: str) -> int | None:
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise InvalidInputError(f"{what} {group!r}: no such group (create it, e.g. with systemd-sysusers)") from None


def _own(path: Path, gid: int | None, mode: int) -> None:
    """Give a socket (or its directory) its group, then its mode; group first, so the mode never
    applies to the wrong group."""
    if gid is not None:
        try:
            os.chown(path, -1, gid)
        except PermissionError:
            raise PermissionDeniedError(
                f"cannot give {path} to group {gid}: the daemon must run as root or be a member of it"
            ) from None
    os.chmod(path, mode)


def open_index(store: BlobStore, rebuild: bool) -> Index:
    """The index, or a clear refusal: a missing or unreadable index over existing blobs is never
    silently replaced (names, pins and sources live only there); --rebuild-index sets the old
    file aside and start-up reconciliation re-adopts every blob from its bytes."""
    path = store.root / "index.db"
    if rebuild:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            old = Path(f"{path}{suffix}")
            if old.exists():
                old.rename(f"{path}{suffix}.broken-{stamp}")
        log.warning("index_rebuild", path=str(path), moved_aside=f"index.db.broken-{stamp}")
        return Index(path)
    if not path.exists():
        blobs = sum(1 for _ in store.digests())
        if blobs:
            raise CorruptedError(
                f"index {path} is missing but the store holds {blobs} blob(s); start once with --rebuild-index "
                "to rebuild it from them (model names and pins are lost)"
            )
    try:
        index = Index(path)
    except CorruptedError as exc:
        raise CorruptedError(
            f"{exc}; start once with --rebuild-index to set it aside and rebuild from the blobs"
        ) from None
    private_files(path)
    return index


def private_files(index_db: Path) -> None:
    """index.db and its WAL files: 0600 whatever the umask they were created under (names,
    sources and pins are the daemon's business)."""
    for suffix in ("", "-wal", "-shm"):
        try:
            os.chmod(f"{index_db}{suffix}", 0o600)
        except FileNotFoundError:
            pass


def share_of_capacity(cfg: Config, nbytes: int, percent: float) -> int:
    """A bound given as bytes, or as a percentage of the capacity (of the store's filesystem
    when the capacity is unlimited); 0 = no bound."""
    if nbytes:
        return nbytes
    if not percent:
        return 0
    base = capacity_bytes(cfg)
    if not base:
        st = os.statvfs(cfg.cache_dir)
        base = st.f_blocks * st.f_frsize
    return int(base * percent / 100)


def lease_quota(cfg: Config) -> int:
    """Bytes one uid may lease (docs/security.md, "Leases and disk"); 0 = no bound."""
    return share_of_capacity(cfg, cfg.lease_quota, cfg.lease_quota_percent)


def tenant_lease_quotas(cfg: Config) -> dict[str, int]:
    """Bytes each declared tenant may lease, all its uids together (docs/security.md, "Tenants")."""
    return {t.name: share_of_capacity(cfg, t.lease_quota, t.lease_quota_percent) for t in cfg.declared_tenants}


def download_quota(cfg: Config, tenant: TenantConfig) -> int:
    """Bytes a declared tenant's own names may take in the store; 0 = no bound."""
    return share_of_capacity(cfg, tenant.download_quota, tenant.download_quota_percent)


def check_places(cfg: Config, env: dict[str, str] | None = None) -> None:
    """Refuse to start where another user controls or could replace the store or a socket
    directory (docs/security.md, "Modes and places")."""
    base = paths.tmp_runtime_base(env or {})
    if base is not None and (cfg.socket_dir.is_relative_to(base) or cfg.admin_socket.is_relative_to(base)):
        paths.ensure_private_base(base)
    for what, d in (
        ("store directory", cfg.cache_dir),
        *((f"socket directory of tenant {t.name or 'default'}", t.socket_dir) for t in cfg.tenants()),
        ("admin socket directory", cfg.admin_socket.parent),
    ):
        paths.check_dir_not_foreign(d, what)


class Daemon:
    def __init__(self, cfg: Config, rebuild_index: bool = False, env: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        check_places(cfg, env)
        self.lock = StoreLock(cfg.cache_dir)
        try:
            self.store = LocalBlobStore(
                cfg.cache_dir,
                immutable=cfg.immutable_blobs,
                readonly=cfg.readonly_descriptors,
                readonly_store=cfg.readonly_store,
            )
            self.index = open_index(self.store, rebuild_index)
        except BaseException:
            self.lock.release()
            raise
        self.leases = Leases(lease_quota(cfg), tenant_lease_quotas(cfg))
        self.metrics = Metrics()
        self.core = build_core(cfg, self.store, self.index, self.leases, self.metrics,
                               download_quota=lambda t: download_quota(cfg, t))  # fmt: skip
        self.metrics.watch_sizes(self._sizes)
        self._metrics_server: Any = None
        self.admin_server: grpc.aio.Server | None = None
        # One client gRPC server and one fd.sock server per tenant, on its own socket directory.
        self.client_servers: list[grpc.aio.Server] = []
        self.fd_servers: list[FdServer] = []
        self.health = health.aio.HealthServicer()
        self._flusher: asyncio.Task[None] | None = None
        self._background: list[asyncio.Task[None]] = []
        self.models_dir: ModelsDir | None = None
        # The sockets this process bound, by path, with the inode it bound: stop() unlinks only
        # these, so a start that fails (a socket of another running daemon) leaves that daemon's
        # sockets alone, and a socket someone re-created since is not ours to remove either.
        self._bound: dict[Path, int] = {}
        self._bound_dev: dict[Path, int] = {}

    def _sockets(self) -> list[Path]:
        return [
            t.socket_dir / n for t in self.cfg.tenants() for n in (paths.CLIENT_SOCKET_NAME, paths.FD_SOCKET_NAME)
        ] + [self.cfg.admin_socket]

    async def start(self) -> None:
        """Reconcile, then bind and serve: the sockets' directories, the servers (one client gRPC
        server and one fd.sock server per tenant), binding, widening their modes, background
        work; ready (health SERVING) only once a cold open can start fetching at once."""
        # Whatever uses the loop's default executor (asyncio.to_thread anywhere) shares the
        # client I/O pool, never the downloads' threads (JobRegistry.job_pool).
        asyncio.get_running_loop().set_default_executor(self.core.client_io)
        report = await asyncio.to_thread(reconcile, self.store, self.index)
        log.info("reconciled", **report)
        self._warn_unused_client_sources()
        tenants = self.cfg.tenants()
        admin_gid, gids = self._prepare_socket_dirs(tenants)
        # The health service answers SERVING for "" from its creation; until start-up is done
        # it must say otherwise, or a probe (or a test) would send work to a daemon not ready.
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self._build_servers(tenants)
        await self._bind(tenants)
        _own(self.cfg.admin_socket, admin_gid, 0o660 if admin_gid is not None else ADMIN_SOCKET_MODE)
        for t in tenants:
            for n in (paths.CLIENT_SOCKET_NAME, paths.FD_SOCKET_NAME):
                _own(t.socket_dir / n, gids[t.name], self.cfg.socket_mode)
        self._start_background()
        # Ready means a cold open starts fetching at once: the S3 clients (boto3's import and
        # client build, ~0.25 s of CPU) are built by now, not by the first request.
        await asyncio.to_thread(self.core.jobs.clients_ready.wait, CLIENT_WARMUP_SECONDS)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("weightcache.v1.Cache", health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "ready",
            cache_dir=str(self.cfg.cache_dir),
            socket_dirs={t.name or "default": str(t.socket_dir) for t in tenants},
            admin_socket=str(self.cfg.admin_socket),
            pid=os.getpid(),
            readonly_descriptors=self.store.view.protected,
        )
        if not self.store.view.protected:
            log.warning("descriptors_writable_path", reason=self.store.view.reason,
                        risk="root with CAP_DAC_OVERRIDE in a client can reopen a granted descriptor for writing "
                        "(docs/security.md)")  # fmt: skip

    def _warn_unused_client_sources(self) -> None:
        if self.cfg.declared_tenants and self.cfg.client_sources:
            # Each tenant's own client_sources decides; the top-level list would mislead a reader.
            log.warning(
                "client_sources_ignored",
                client_sources=list(self.cfg.client_sources),
                reason="[[tenants]] are declared: each tenant's own client_sources applies, the top-level "
                "client_sources to no one, and the top-level socket_dir is not bound",
            )

    def _prepare_socket_dirs(self, tenants: tuple[TenantConfig, ...]) -> tuple[int | None, dict[str, int | None]]:
        """Every socket directory, owned by its group; any stale socket claimed. The admin
        group's id and each tenant's socket group id."""
        admin_gid = resolve_group(self.cfg.admin_group, "admin_group")
        self.cfg.admin_socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        gids = {}
        for t in tenants:
            t.socket_dir.mkdir(parents=True, exist_ok=True)
            gids[t.name] = resolve_group(t.socket_group, f"socket_group of tenant {t.name or 'default'}")
            _own(t.socket_dir, gids[t.name], self.cfg.socket_dir_mode)
        for p in self._sockets():
            _claim_socket(p)
        return admin_gid, gids

    def _build_servers(self, tenants: tuple[TenantConfig, ...]) -> None:
        opts = [
            ("grpc.max_receive_message_length", 4 << 20),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_concurrent_streams", 1024),
        ]
        limits = self.cfg.limits
        client_opts = [
            ("grpc.max_receive_message_length", limits.request_bytes_max),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_concurrent_streams", limits.streams_per_connection),
        ]
        self.admin_server = grpc.aio.server(options=opts)
        pb_grpc.add_AdminServicer_to_server(AdminService(self.core, self.client_sockets), self.admin_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.admin_server)
        for t in tenants:
            # A connection's tenant is the socket it came in on: each tenant's sockets are
            # served by their own servers, bound to that tenant's scope.
            scope = self.core.scopes[t.name]
            server = grpc.aio.server(options=client_opts)
            pb_grpc.add_CacheServicer_to_server(CacheService(self.core, scope), server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            self.client_servers.append(server)
            self.fd_servers.append(
                FdServer(
                    self.core,
                    str(t.socket_dir / paths.FD_SOCKET_NAME),
                    t.max_clients,
                    max_per_uid=self.cfg.max_clients_per_uid,
                    frame_timeout=self.cfg.fd_frame_timeout,
                    idle_timeout=self.cfg.fd_idle_timeout,
                    on_health=self._fd_health,
                    scope=scope,
                )
            )

    async def _bind(self, tenants: tuple[TenantConfig, ...]) -> None:
        """Bind and start every server. Every socket is created 0600 and widened only after its
        group is set: never, even briefly, reachable by someone the configuration does not name."""
        assert self.admin_server is not None
        old = os.umask(0o177)
        try:
            self.admin_server.add_insecure_port(f"unix://{self.cfg.admin_socket}")
            self._mark_bound(self.cfg.admin_socket)
            for t, server in zip(tenants, self.client_servers, strict=True):
                server.add_insecure_port(f"unix://{t.socket_dir / paths.CLIENT_SOCKET_NAME}")
                self._mark_bound(t.socket_dir / paths.CLIENT_SOCKET_NAME)
            await self.admin_server.start()
            for server in self.client_servers:
                await server.start()
            for t, fd_server in zip(tenants, self.fd_servers, strict=True):
                await fd_server.start()
                self._mark_bound(t.socket_dir / paths.FD_SOCKET_NAME)
        finally:
            os.umask(old)

    def _start_background(self) -> None:
        """Metrics, the use-time flusher, interrupted downloads, the models.d watcher."""
        if self.cfg.metrics_address:
            try:
                self._metrics_server = self.metrics.serve(self.cfg.metrics_address)
            except OSError as exc:
                raise BusyError(f"metrics address {self.cfg.metrics_address}: {exc.strerror or exc}") from None
            log.info("metrics_serving", address=self.cfg.metrics_address)
        self._flusher = asyncio.get_running_loop().create_task(self._flush_uses())
        self._background = self.core.resume_ingests()
        if self.cfg.models_dir is not None:
            self.models_dir = ModelsDir(self.core, self.cfg.models_dir)
            self.models_dir.start()

    def client_sockets(self) -> list[ClientSockets]:
        """Each tenant's client sockets as this process bound them (Admin.Stats, cachectl health)."""
        out = []
        for t in self.cfg.tenants():
            client, fd = t.socket_dir / paths.CLIENT_SOCKET_NAME, t.socket_dir / paths.FD_SOCKET_NAME
            out.append(
                ClientSockets(
                    tenant=t.name,
                    socket_dir=str(t.socket_dir),
                    device=self._bound_dev.get(client, 0),
                    client_socket_inode=self._bound.get(client, 0),
                    fd_socket_inode=self._bound.get(fd, 0),
                )
            )
        return out

    def _mark_bound(self, path: Path) -> None:
        """Remember a socket just bound (each path was claimed first: what is there now is ours)."""
        try:
            st = os.stat(path, follow_symlinks=False)
            self._bound[path], self._bound_dev[path] = st.st_ino, st.st_dev
        except FileNotFoundError:
            pass

    async def _fd_health(self, accepting: bool) -> None:
        """Health tells the truth: a daemon whose fd.sock cannot accept cannot serve models."""
        status = health_pb2.HealthCheckResponse.SERVING if accepting else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", "weightcache.v1.Cache"):
            await self.health.set(service, status)
        log.warning("health", serving=accepting, reason="fd.sock accept " + ("recovered" if accepting else "failing"))

    def _sizes(self) -> dict[str, float]:
        s = self.core.stats()
        return {
            "stored_bytes": s.stored_bytes,
            "logical_bytes": s.logical_bytes,
            "held_bytes": s.held_bytes,
            "capacity_bytes": s.capacity,
            "leases": s.leases,
            "models": s.models,
            "active_downloads": s.active_downloads,
            "streaming_snapshots": len(self.core.jobs.early_ids()),
            "streaming_readers": sum(self.core.jobs.readers(sid) for sid in self.core.jobs.early_ids()),
            "readonly_descriptors": 1.0 if self.store.view.protected else 0.0,
        }

    async def _flush_uses(self) -> None:
        while True:
            await asyncio.sleep(USE_FLUSH_SECONDS)
            await asyncio.to_thread(self.index.flush_uses)

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        if self.models_dir is not None:
            self.models_dir.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        await self.health.enter_graceful_shutdown()
        await self.core.jobs.shutdown()
        for fd_server in self.fd_servers:
            await fd_server.stop()
        for srv in (*self.client_servers, self.admin_server):
            if srv is not None:
                await srv.stop(grace=2)
        for p, ino in self._bound.items():
            unlink_if_same(p, ino)
        for pool in (self.core.client_io, self.core.admin_io):
            pool.shutdown(wait=False, cancel_futures=True)  # queued work is moot now; never holds up SIGTERM
        self.index.close()
        self.store.view.close()
        self.lock.release()
        log.info("stopped")


def sd_notify(state: str, env: dict[str, str]) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(state.encode())


async def serve(cfg: Config, env: dict[str, str], rebuild_index: bool = False) -> None:
    raise_nofile_limit()  # logged with the fd.sock bounds derived from it ("fd_limits")
    daemon = Daemon(cfg, rebuild_index, env)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    taskdump.install(loop, signal.SIGUSR2)  # every task's await chain; SIGUSR1 dumps the threads
    try:
        await daemon.start()
    except BaseException:
        await daemon.stop()
        raise
    sd_notify("READY=1", env)
    watchdog_usec = int(env.get("WATCHDOG_USEC", "0") or 0)
    pinger: asyncio.Task[None] | None = None
    if watchdog_usec:

        async def ping() -> None:
            while True:
                await asyncio.sleep(watchdog_usec / 2e6)
                sd_notify("WATCHDOG=1", env)

        pinger = loop.create_task(ping())
    await stop.wait()
    sd_notify("STOPPING=1", env)
    if pinger:
        pinger.cancel()
    await daemon.stop()
