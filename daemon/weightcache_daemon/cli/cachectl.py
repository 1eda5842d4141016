"""cachectl: the operator CLI over the admin socket.

Every command takes --json (one schema, errors included: cli/jsonout.py and docs/cachectl.md);
prefetch draws a progress bar on a terminal and is quiet otherwise; a failure prints the
daemon's message and exits non-zero (2 for bad input, 130 when interrupted, 1 for everything
else); a reader that stops early (``| head``) ends it quietly.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc

from weightcache import Progress, paths
from weightcache.contract.errors import DaemonUnavailableError, InvalidInputError, WeightcacheError, from_rpc_error
from weightcache.progress import Bar, human
from weightcache.v1 import weightcache_pb2 as pb
from weightcache.v1 import weightcache_pb2_grpc as pb_grpc
from weightcache_daemon.cli.jsonout import (
    Interrupted,
    dump,
    error_document,
    exit_code,
    message_to_json,
    quiet_exit_on_closed_pipe,
)


def admin_socket(arg: Path | None) -> Path:
    return paths.admin_socket(arg, os.environ, os.geteuid())


def client_socket_dir(arg: Path | None) -> Path:
    return paths.client_socket_dir(arg, os.environ, os.geteuid())


def _stub(sock: Path) -> pb_grpc.AdminStub:
    if not sock.exists():
        raise DaemonUnavailableError(
            f"admin socket {sock} does not exist: is weightcached running? (--admin-socket or "
            "WEIGHTCACHE_ADMIN_SOCKET point elsewhere)"
        )
    channel = grpc.insecure_channel(f"unix://{sock}", options=[("grpc.max_receive_message_length", 64 << 20)])
    return pb_grpc.AdminStub(channel)


def _call(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None


def _dict(msg: Any) -> dict[str, Any]:
    return message_to_json(msg)


def _out(data: Any) -> None:
    sys.stdout.write(dump(data))


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


# ---------------------------------------------------------------- commands


def cmd_prefetch(stub: pb_grpc.AdminStub, a: argparse.Namespace) -> int:
    req = pb.PrefetchRequest(uri=a.uri, name=a.name or "", pin=a.pin, include=a.include or [], exclude=a.exclude or [])
    bar = Bar(enabled=sys.stderr.isatty() and not a.json)
    model = None
    try:
        for ev in stub.Prefetch(req):
            if ev.HasField("progress"):
                bar(Progress.from_pb(ev.progress))
            else:
                model = ev.model
    except grpc.RpcError as exc:
        bar.close()
        raise from_rpc_error(exc) from None
    except KeyboardInterrupt:
        bar.close()
        raise Interrupted(
            f"the daemon goes on downloading {a.uri} (a prefetch is the daemon's job, not this "
            f"command's): `cachectl ls` shows its progress, `cachectl prefetch {a.uri}` again waits for it, "
            "`cachectl evict NAME` removes it once it is in"
        ) from None
    bar.close()
    if model is None:
        raise WeightcacheError("the daemon ended the prefetch without a result")
    if a.json:
        _out(_dict(model))
    else:
        print(
            f"{model.name}: snapshot {model.snapshot_id}, {model.file_count} files, {human(model.size)}"
            f"{' (pinned)' if model.pinned else ''}\n  {model.path}"
        )
    return 0


def _leases(m: Any) -> str:
    return ",".join(f"{le.pid}/{le.uid}" for le in m.leases) or "-"


def _percent(p: Any) -> str:
    return f"{100 * p.bytes_done / p.bytes_total:.0f}%" if p.bytes_total else "(listing)"


def _download_dict(d: Any) -> dict[str, Any]:
    out = _dict(d)
    out["downloading"] = out.pop("progress")
    return out


def cmd_ls(stub: pb_grpc.AdminStub, a: argparse.Namespace) -> int:
    resp = _call(stub.List, pb.ListRequest())
    if a.json:
        # A JSON listing keeps one shape (what is in the cache); downloads in flight are asked for.
        _out([_download_dict(d) for d in resp.downloads] if a.downloads else [_dict(m) for m in resp.models])
        return 0
    rows = [
        [
            m.name,
            m.snapshot_id[:12],
            human(m.size),
            str(m.file_count),
            "yes" if m.pinned else "",
            _when(m.last_used_at),
            _leases(m),
            m.source,
        ]
        for m in resp.models
    ] + [
        [
            d.name,
            d.snapshot_id[:12] or "-",
            human(d.progress.bytes_total),
            str(d.progress.files_total),
            "",
            f"downloading {_percent(d.progress)}",
            f"{d.readers} reader(s)",
            d.source,
        ]
        for d in resp.downloads
    ]
    _table(rows, ["NAME", "SNAPSHOT", "SIZE", "FILES", "PINNED", "LAST USED", "LEASES(pid/uid)", "SOURCE"])
    return 0


def cmd_show(stub: pb_grpc.AdminStub, a: argparse.Namespace) -> int:
    resp = _call(stub.Show, pb.ShowRequest(model=a.model, tensors=a.tensors))
    if a.json:
        _out(_dict(resp))
        return 0
    m, man = resp.model, resp.manifest
    if resp.HasField("download"):
        d = resp.download
        print(f"name:      {d.name} (downloading {_percent(d.progress)}: {human(d.progress.bytes_done)} of "
              f"{human(d.progress.bytes_total)}, {human(int(d.progress.bytes_per_second))}/s)")  # fmt: skip
        print(f"snapshot:  {man.snapshot_id} (provisional until the download is verified)")
        print(f"source:    {man.source}")
        print(f"readers:   {d.readers} process(es) reading it while it downloads")
    else:
        print(f"name:      {m.name or '(unnamed snapshot)'}")
    if not resp.HasField("download"):
        print(f"snapshot:  {man.snapshot_id}")
        print(f"source:    {man.source}")
        print(f"path:      {man.path}")
    if m.name:
        print(
            f"size:      {human(m.size)} in {m.file_count} files; pinned: {'yes' if m.pinned else 'no'}; "
            f"last used {_when(m.last_used_at)}"
        )
        print(f"leases:    {', '.join(f'pid {le.pid} uid {le.uid} gid {le.gid}' for le in m.leases) or 'none'}")
    print("files:")
    for f in man.files:
        print(f"  {human(f.size):>10}  sha256:{f.sha256[:16]}…  {f.path}")
    if a.tensors:
        print(f"tensors ({len(man.tensors)} in {len(man.layers)} layer groups):")
        for t in man.tensors:
            print(f"  {t.layer:<12} {t.name:<60} {t.dtype:<8} {list(t.shape)!s:<20} {human(t.length):>10}  {t.file}")
    return 0


def cmd_evict(stub: pb_grpc.AdminStub, a: argparse.Namespace) -> int:
    if not a.models and not a.all_unpinned:
        raise InvalidInputError("evict needs MODEL names or --all-unpinned")
    resp = _call(
        stub.Evict, pb.EvictRequest(models=a.models, all_unpinned=a.all_unpinned, dry_run=a.dry_run, force=a.force)
    )
    if a.json:
        _out(_dict(resp))
        return 0
    verb = "would evict" if resp.dry_run else "evicted"
    print(f"{verb} {len(resp.models)} model(s): {', '.join(resp.models) or '-'}")
    print(
        f"  snapshots: {len(resp.snapshots)}, blobs: {len(resp.blobs)}, "
        f"{'would free' if resp.dry_run else 'freed'} {human(resp.bytes_freed)}"
    )
    return 0


def cmd_pin(stub: pb_grpc.AdminStub, a: argparse.Namespace, pin: bool) -> int:
    m = _call(stub.Pin if pin else stub.Unpin, pb.PinRequest(model=a.model))
    if a.json:
        _out(_dict(m))
    else:
        print(f"{m.name}: {'pinned' if m.pinned else 'unpinned'}")
    return 0


def cmd_stats(stub: pb_grpc.AdminStub, a: argparse.Namespace) -> int:
    s = _call(stub.Stats, pb.StatsRequest())
    if a.json:
        _out(_dict(s))
        return 0
    saved = s.logical_bytes - s.stored_bytes
    print(f"cache dir:        {s.cache_dir}")
    print(f"models:           {s.models} ({s.snapshots} snapshots, {s.blobs} blobs)")
    print(f"logical bytes:    {human(s.logical_bytes)}")
    print(f"stored bytes:     {human(s.stored_bytes)}  (dedup saves {human(max(saved, 0))})")
    print(
        f"capacity:         {human(s.max_size) if s.max_size else 'unlimited'}; filesystem free {human(s.filesystem_free)}"
    )
    print(f"downloaded:       {human(s.bytes_downloaded)} since start; {s.active_downloads} download(s) running")
    print(f"leases:           {s.leases}; evicted but still open: {human(s.held_bytes)}")
    return 0


def cmd_verify(stub: pb_grpc.AdminStub, a: argparse.Namespace) -> int:
    bar = Bar(enabled=sys.stderr.isatty() and not a.json)
    result = None
    try:
        for ev in stub.Verify(pb.VerifyRequest(model=a.model or "", repair=a.repair)):
            if ev.HasField("progress"):
                p = ev.progress
                bar.update(p.bytes_done, p.bytes_total, note=f"{p.files_done}/{p.files_total} blobs")
            else:
                result = ev.result
    except grpc.RpcError as exc:
        bar.close()
        raise from_rpc_error(exc) from None
    bar.close()
    assert result is not None
    if a.json:
        _out(_dict(result))
    else:
        print(f"checked {result.blobs_checked} blob(s), {human(result.bytes_checked)}")
        users = {u.sha256: u for u in result.damaged}
        for what, digests in (("CORRUPT", result.corrupt), ("MISSING", result.missing)):
            for d in digests:
                u = users.get(d)
                used = (f"used by {', '.join(u.models)} ({', '.join(u.paths)})" if u is not None and u.models
                        else "used by no named model")  # fmt: skip
                print(f"  {what} sha256:{d}: {used}")
        if result.damaged and not a.repair:
            print("  -> cachectl verify --repair re-downloads the models named above")
        for d in result.quarantined:
            print(f"  quarantined sha256:{d} (never handed out again)")
        for m in result.repaired:
            print(f"  repaired {m} (re-downloaded)")
    if a.repair and (result.corrupt or result.missing):
        return 0 if result.repaired else 1
    return 1 if (result.corrupt or result.missing) else 0


def cmd_gc(stub: pb_grpc.AdminStub, a: argparse.Namespace) -> int:
    r = _call(stub.GC, pb.GCRequest(dry_run=a.dry_run))
    if a.json:
        _out(_dict(r))
        return 0
    verb = "would remove" if r.dry_run else "removed"
    print(
        f"{verb} {len(r.blobs)} orphan blob(s), {len(r.ingests)} stale ingest(s), {len(r.snapshots)} unnamed "
        f"snapshot(s): {human(r.bytes_freed)}"
    )
    return 0


@dataclass(frozen=True)
class _Target:
    """One client socket directory to check, and what the daemon says it bound there (None
    when no daemon answered on the admin socket: then nothing can vouch for whose sockets
    they are)."""

    label: str  # "" for the single default tenant, else "tenant NAME"
    socket_dir: Path
    bound: pb.ClientSockets | None


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _daemon_sockets(admin: Path) -> list[pb.ClientSockets] | None:
    """The client socket directories the daemon on `admin` bound; None when it does not answer."""
    try:
        resp = _call(_stub(admin).Stats, pb.StatsRequest(), timeout=5)
    except WeightcacheError:
        return None
    return list(resp.client_sockets)


def _targets(admin: Path, socket_dir: Path | None) -> tuple[list[_Target], list[tuple[str, str, str, str]]]:
    """What to check: every tenant's directory the daemon reports, or (with --socket-dir) that one.

    Without an answer on the admin socket, --socket-dir or the client's default is checked as
    it is. With one, a --socket-dir that holds none of the daemon's sockets is a FAIL of its
    own: its sockets, if they answer, belong to some other daemon."""
    bound = _daemon_sockets(admin)
    if not bound:  # no daemon answered (or one too old to say): the directory as given
        return [_Target("", client_socket_dir(socket_dir), None)], []

    def label(b: pb.ClientSockets) -> str:
        return f"tenant {b.tenant}" if b.tenant else ""

    if socket_dir is None:
        return [_Target(label(b), Path(b.socket_dir), b) for b in bound], []
    here = _identity(socket_dir / paths.CLIENT_SOCKET_NAME)
    for b in bound:
        if Path(b.socket_dir) == socket_dir or (here is not None and here == (b.device, b.client_socket_inode)):
            # The same directory by path, or seen through another mount (a container's).
            return [_Target(label(b), socket_dir, b)], []
    known = ", ".join(b.socket_dir for b in bound)
    return [], [
        (
            "client socket directory",
            "FAIL",
            f"{socket_dir} holds none of the client sockets of the daemon at {admin} (its directories: {known})",
            "check the directory the daemon bound (leave --socket-dir out to check all of them), or point "
            "--admin-socket at the daemon that serves this one",
        )
    ]


def _not_ours(path: Path, target: _Target, inode: int) -> str:
    """Why `path` is not the socket the daemon bound there; "" when it is."""
    if target.bound is None:
        return ""
    if not inode:
        return f"{path}: the daemon reports it did not bind this socket"
    now = _identity(path)
    if now is None:
        return f"{path}: gone (the daemon bound it; something removed it since)"
    if now != (target.bound.device, inode):
        return f"{path} is not the socket this daemon bound: another process bound that path since"
    return ""


def _health_check(target: _Target) -> tuple[str, str, str, str]:
    name = f"client health service ({target.label})" if target.label else "client health service"
    health = target.socket_dir / paths.CLIENT_SOCKET_NAME
    bound_ino = target.bound.client_socket_inode if target.bound is not None else 0
    wrong = _not_ours(health, target, bound_ino)
    if wrong:
        return name, "FAIL", wrong, "stop whatever else serves that directory, then restart weightcached"
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"unix://{health}"))
        status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
    except grpc.RpcError as exc:
        return (
            name,
            "FAIL",
            f"{health}: {exc.details()}",
            "start weightcached, or point --socket-dir / WEIGHTCACHE_SOCKET_DIR at its client directory",
        )
    serving = status == health_pb2.HealthCheckResponse.SERVING
    return (
        name,
        "PASS" if serving else "FAIL",
        f"{health}: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}",
        "" if serving else "the daemon is shutting down or not ready",
    )


def _fd_check(target: _Target) -> tuple[str, str, str, str]:
    import socket as socketmod

    name = f"descriptor socket ({target.label})" if target.label else "descriptor socket"
    fd = target.socket_dir / paths.FD_SOCKET_NAME
    wrong = _not_ours(fd, target, target.bound.fd_socket_inode if target.bound is not None else 0)
    if wrong:
        return name, "FAIL", wrong, "stop whatever else serves that directory, then restart weightcached"
    with socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_STREAM) as s:
        try:
            s.connect(str(fd))
        except OSError as exc:
            return name, "FAIL", f"{fd}: {exc.strerror}", "containers fall back to streamed reads without it"
    return name, "PASS", f"{fd} accepts connections", ""


def _client_checks(admin: Path, socket_dir: Path | None, fd: bool = True) -> list[tuple[str, str, str, str]]:
    """What a client would see on each client socket directory of the daemon: its health
    service (and fd.sock), and that they are the sockets this daemon bound."""
    targets, out = _targets(admin, socket_dir)
    for t in targets:
        out.append(_health_check(t))
        if fd:
            out.append(_fd_check(t))
    return out


def cmd_doctor(admin: Path, a: argparse.Namespace) -> int:
    """Runs every check it can: with the daemon down, the client-side checks still run and the
    admin socket is one more FAIL with what to do, not a reason to stop."""
    checks = _client_checks(admin, a.socket_dir)
    try:
        resp = _call(_stub(admin).Doctor, pb.DoctorRequest(timeout_seconds=a.timeout))
        checks += [(c.name, pb.Check.Status.Name(c.status), c.detail, c.hint) for c in resp.checks]
    except WeightcacheError as exc:
        checks.append(("admin API", "FAIL", str(exc), "start weightcached, or point --admin-socket / "
                       "WEIGHTCACHE_ADMIN_SOCKET at its admin socket"))  # fmt: skip
    if a.json:
        _out([{"name": n, "status": s, "detail": d, "hint": h} for n, s, d, h in checks])
    else:
        for n, s, d, h in checks:
            print(f"[{s}] {n}: {d}")
            if h:
                print(f"       -> {h}")
    return 1 if any(s == "FAIL" for _, s, _, _ in checks) else 0


def cmd_health(admin: Path, a: argparse.Namespace) -> int:
    """One verdict for every tenant's client socket: PASS only when each says SERVING."""
    checks = _client_checks(admin, a.socket_dir, fd=False)
    status = "FAIL" if any(c[1] == "FAIL" for c in checks) else "PASS"
    detail = "; ".join(c[2] for c in checks)
    hint = "; ".join(c[3] for c in checks if c[3])
    if a.json:
        _out({"name": "client health service", "status": status, "detail": detail, "hint": hint})
    else:
        for _, s, d, _ in checks:
            print(f"[{s}] {d}")
    return 0 if status == "PASS" else 1


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error under --json is the JSON error document too."""

    # Class-wide, not per instance: argparse builds the subcommands' parsers itself, from the class.
    json_errors = False

    def error(self, message: str) -> NoReturn:
        if self.json_errors:
            command = self.prog.removeprefix("cachectl").strip() or "cachectl"
            _out(error_document(command, None, message=f"{message} (see {self.prog} --help)"))
            sys.exit(2)
        super().error(message)


def build_parser(json_errors: bool = False) -> argparse.ArgumentParser:
    _Parser.json_errors = json_errors
    ap = _Parser(prog="cachectl", description="Operate the weightcache daemon over its admin socket.")
    ap.add_argument("--admin-socket", type=Path, help="default: $WEIGHTCACHE_ADMIN_SOCKET, then the daemon's default")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    p = add("prefetch", "download a model into the cache (s3://bucket/prefix/ or file:///dir/)")
    p.add_argument("uri")
    p.add_argument("--name", help="model name (default: the URI's last path component)")
    p.add_argument("--pin", action="store_true", help="never evict it automatically")
    p.add_argument("--include", action="append", metavar="GLOB", help="only files matching (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="skip files matching (repeatable)")
    p = add("ls", "list cached models, and downloads in flight with their early readers")
    p.add_argument("--downloads", action="store_true", help="with --json: list the downloads in flight instead")
    p = add("show", "show one model (name, source URI or snapshot id)")
    p.add_argument("model")
    p.add_argument("--tensors", action="store_true", help="also list every tensor")
    p = add("evict", "remove models (plans first; blobs shared with other models stay)")
    p.add_argument("models", nargs="*", metavar="MODEL")
    p.add_argument("--all-unpinned", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the bytes it would free")
    p.add_argument("--force", action="store_true", help="also evict models leased by running processes")
    for name in ("pin", "unpin"):
        p = add(name, f"{name} a model")
        p.add_argument("model")
    add("stats", "sizes: logical vs stored (dedup), downloads, leases")
    p = add("verify", "re-hash blobs; quarantine corrupt ones; --repair re-downloads their models")
    p.add_argument("model", nargs="?")
    p.add_argument("--repair", action="store_true", help="re-download the models that use a bad blob")
    p = add("gc", "remove orphan blobs, stale ingests and unnamed snapshots")
    p.add_argument("--dry-run", action="store_true")
    p = add("doctor", "check sockets, store, index, sources and page cache; exit 1 on any FAIL")
    p.add_argument(
        "--socket-dir",
        type=Path,
        help="client socket directory to check (default: every tenant's, as the daemon reports them)",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per source probe")
    p = add("health", "exit 0 if each client socket's gRPC health service says SERVING (probes)")
    p.add_argument(
        "--socket-dir",
        type=Path,
        help="client socket directory to check (default: every tenant's, as the daemon reports them)",
    )
    return ap


def _fail(command: str, exc: BaseException, as_json: bool) -> int:
    """Report a failure in the one shape of its mode; the exit status for it."""
    if as_json:
        _out(error_document(command, exc))
    else:
        kind = "interrupted" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__
        text = str(exc) or "interrupted"
        print(f"cachectl {command}: {kind}: {text}", file=sys.stderr)
    return exit_code(exc)


HANDLERS: dict[str, Callable[[pb_grpc.AdminStub, argparse.Namespace], int]] = {
    "prefetch": cmd_prefetch,
    "ls": cmd_ls,
    "show": cmd_show,
    "evict": cmd_evict,
    "pin": lambda s, a: cmd_pin(s, a, True),
    "unpin": lambda s, a: cmd_pin(s, a, False),
    "stats": cmd_stats,
    "verify": cmd_verify,
    "gc": cmd_gc,
}


def run(a: argparse.Namespace) -> int:
    try:
        if a.command == "health":
            return cmd_health(admin_socket(a.admin_socket), a)
        if a.command == "doctor":
            return cmd_doctor(admin_socket(a.admin_socket), a)
        return HANDLERS[a.command](_stub(admin_socket(a.admin_socket)), a)
    except (WeightcacheError, KeyboardInterrupt) as exc:
        return _fail(a.command, exc, a.json)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        a = build_parser("--json" in args).parse_args(args)
        code = run(a)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's own flush at exit
    except BrokenPipeError:
        quiet_exit_on_closed_pipe()
    sys.exit(code)


if __name__ == "__main__":
    main()
