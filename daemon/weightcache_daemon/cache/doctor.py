"""`cachectl doctor`, the daemon's half: checks that need the daemon's view and credentials.

Each check returns (name, status, detail, hint); sources are probed with a short timeout and
one attempt, and the real error text is kept, so a wrong key or an unreachable endpoint reads
as such.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from weightcache.contract.errors import WeightcacheError
from weightcache.progress import human
from weightcache_daemon.cache.core import Core
from weightcache_daemon.config import SourceConfig
from weightcache_daemon.sources import parse_uri

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
Result = tuple[str, str, str, str]


def run_checks(core: Core, timeout: float) -> list[Result]:
    out: list[Result] = []
    out += _store(core)
    out += _index(core)
    out += _sockets(core)
    out += _sources(core, timeout)
    out += _page_cache(core)
    return out


def _store(core: Core) -> list[Result]:
    root = core.store.root
    out: list[Result] = []
    probe = core.store.ingest / f".doctor-{os.getpid()}"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
        out.append(("store writable", PASS, f"{root}", ""))
    except OSError as exc:
        out.append(("store writable", FAIL, f"{root}: {exc.strerror}", "give the service user write access to it"))
    view = core.store.view
    if view.protected:
        out.append(("read-only descriptors", PASS, view.reason, ""))
    else:
        out.append(("read-only descriptors", WARN, f"{view.reason}: a client root with CAP_DAC_OVERRIDE can reopen a "
                    "granted descriptor for writing through /proc/self/fd",
                    "run the daemon with CAP_SYS_ADMIN (readonly_descriptors = auto or require), or set "
                    "immutable_blobs = true and keep CAP_DAC_OVERRIDE out of client containers"))  # fmt: skip
    fs_type = _fs_type(root)
    direct = _o_direct_ok(core.store.ingest)
    out.append(("store filesystem", PASS if direct else WARN, f"{fs_type}; O_DIRECT {'yes' if direct else 'no'}",
                "" if direct else "downloads fall back to buffered writes (slower on large models)"))  # fmt: skip
    st = os.statvfs(root)
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    usage = core.usage()
    cap = core.capacity
    if cap and usage > cap * core.cfg.high_watermark:
        out.append(("capacity", WARN, f"{human(usage)} used of {human(cap)}", "unpin models or raise max_size"))
    else:
        out.append(("capacity", PASS, f"{human(usage)} used of {human(cap) if cap else 'unlimited'}", ""))
    if cap and cap - usage > free:
        out.append(("free space", WARN, f"capacity left {human(cap - usage)} but the filesystem has {human(free)} free",
                    "lower max_size or free the filesystem: downloads will hit ENOSPC before the capacity"))  # fmt: skip
    elif free < 0.05 * total:
        out.append(
            ("free space", WARN, f"{human(free)} free of {human(total)}", "free space on the store's filesystem")
        )
    else:
        out.append(("free space", PASS, f"{human(free)} free of {human(total)}", ""))
    return out


def _index(core: Core) -> list[Result]:
    indexed = core.index.blobs()
    on_disk = set(core.store.digests())
    missing = [d for d in indexed if d not in on_disk]
    orphans = [d for d in on_disk if d not in indexed]
    bad = core.index.quarantined()
    out: list[Result] = []
    detail = f"{len(indexed)} blobs indexed, {len(on_disk)} on disk, {len(missing)} missing, {len(orphans)} orphaned"
    if missing:
        out.append(
            ("index vs blobs", FAIL, detail, "restart the daemon (it drops the rows) or cachectl verify --repair")
        )
    elif orphans:
        out.append(("index vs blobs", WARN, detail, "cachectl gc removes orphans"))
    else:
        out.append(("index vs blobs", PASS, detail, ""))
    if bad:
        out.append(("quarantine", WARN, f"{len(bad)} blob(s) quarantined", "cachectl verify --repair"))
    return out


def _sockets(core: Core) -> list[Result]:
    cfg = core.cfg
    out: list[Result] = []
    try:
        st = os.stat(cfg.admin_socket)
        mode = stat.S_IMODE(st.st_mode)
        ok = mode & 0o007 == 0 and (mode & 0o070 == 0 or cfg.admin_group is not None)
        out.append(("admin socket", PASS if ok else FAIL, f"{cfg.admin_socket} mode {oct(mode)}",
                    "" if ok else "the admin socket must not be reachable by clients"))  # fmt: skip
    except OSError as exc:
        out.append(("admin socket", FAIL, f"{cfg.admin_socket}: {exc.strerror}", "restart the daemon"))
    for t in cfg.tenants():
        # Each tenant's socket directory (the default one when none are declared).
        tenant = f" of tenant {t.name}" if t.name else ""
        if cfg.admin_socket.parent.resolve() == t.socket_dir.resolve():
            out.append((f"admin socket placement{tenant}", FAIL, "inside the client socket directory",
                        "move admin_socket"))  # fmt: skip
        for name in ("weightcache.sock", "fd.sock"):
            p = t.socket_dir / name
            try:
                mode = stat.S_IMODE(os.stat(p).st_mode)
                ok = mode & 0o007 == 0
                out.append((f"client socket {name}{tenant}", PASS if ok else WARN, f"{p} mode {oct(mode)}",
                            "" if ok else "others can connect: set socket_mode"))  # fmt: skip
            except OSError as exc:
                out.append((f"client socket {name}{tenant}", FAIL, f"{p}: {exc.strerror}", "restart the daemon"))
    return out


def _sources(core: Core, timeout: float) -> list[Result]:
    targets: dict[str, str] = {}
    for s in core.cfg.sources:
        # A prefix naming a bucket (or directory) is a location to probe; "s3://" alone is only
        # settings for every bucket, probed through the models that use it.
        if (s.prefix.startswith("s3://") and len(s.prefix) > len("s3://")) or s.prefix.startswith("file:///"):
            targets[s.prefix] = "configured"
    for row in core.index.models():
        targets.setdefault(row.source, f"model {row.name}")
    out: list[Result] = []
    for uri, why in sorted(targets.items()):
        name = f"source {uri} ({why})"
        try:
            scheme, bucket, prefix = parse_uri(uri)
        except WeightcacheError as exc:
            out.append((name, FAIL, str(exc), "fix the URI"))
            continue
        if scheme == "s3" and not bucket:
            continue
        started = time.monotonic()
        try:
            if scheme == "s3":
                _probe_s3(core.cfg.source_for(uri), bucket, prefix, timeout)
            elif scheme == "file":
                if not Path(prefix).is_dir():
                    raise OSError(f"{prefix} is not a directory")
                os.listdir(prefix)
            out.append((name, PASS, f"reachable in {1000 * (time.monotonic() - started):.0f} ms", ""))
        except Exception as exc:  # noqa: BLE001 - every failure is a diagnosis, with its own text
            out.append((name, FAIL, f"{type(exc).__name__}: {exc}",
                        "check endpoint_url, credentials and network for this source"))  # fmt: skip
    if not targets:
        out.append(("sources", PASS, "no sources configured or used yet", ""))
    return out


def _probe_s3(cfg: SourceConfig, bucket: str, prefix: str, timeout: float) -> None:
    import boto3
    from botocore.config import Config as BotoConfig

    session = boto3.session.Session(profile_name=cfg.profile) if cfg.profile else boto3.session.Session()
    client = session.client(
        "s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region, aws_access_key_id=cfg.access_key_id,
        aws_secret_access_key=cfg.secret_access_key,
        config=BotoConfig(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1},
                          proxies={"http": cfg.proxy, "https": cfg.proxy} if cfg.proxy else None),
    )  # fmt: skip
    try:
        client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    finally:
        client.close()


def _page_cache(core: Core) -> list[Result]:
    mem = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, _, v = line.partition(":")
            mem[k] = int(v.split()[0]) * 1024
    except OSError:
        return []
    largest = max((core.view(r).size for r in core.index.models()), default=0)
    avail = mem.get("MemAvailable", 0)
    detail = f"MemAvailable {human(avail)}, page cache {human(mem.get('Cached', 0))}, largest model {human(largest)}"
    if largest > avail:
        return [("page cache", WARN, detail, "the largest model cannot stay in the page cache: loads read from disk")]
    return [("page cache", PASS, detail, "")]


def _fs_type(path: Path) -> str:
    best, fstype = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and str(path.resolve()).startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    except OSError:
        pass
    return f"{fstype} at {best or '?'}"


def _o_direct_ok(directory: Path) -> bool:
    p = directory / f".doctor-direct-{os.getpid()}"
    try:
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        os.close(fd)
        return True
    except OSError:
        return False
    finally:
        p.unlink(missing_ok=True)
