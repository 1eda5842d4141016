"""weightcached: command line entry point."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import os
import signal
import sys
from pathlib import Path

from weightcache.contract.errors import WeightcacheError
from weightcache_daemon import __version__, config
from weightcache_daemon.observe import logs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="weightcached", description="Node-level model-weight cache daemon.")
    ap.add_argument("--config", type=Path, help="TOML config file (default: $WEIGHTCACHE_CONFIG, else none)")
    ap.add_argument("--cache-dir", type=Path, help="store directory (blobs, snapshots, index.db)")
    ap.add_argument("--socket-dir", type=Path, help="client socket directory (weightcache.sock, fd.sock)")
    ap.add_argument("--admin-socket", type=Path, help="admin socket path (outside the client socket directory)")
    ap.add_argument("--max-size", help="capacity, e.g. 800G (0 = unlimited)")
    ap.add_argument("--log-format", choices=["json", "console"])
    ap.add_argument("--metrics-address", help="HOST:PORT for Prometheus metrics (default: off in user mode)")
    ap.add_argument(
        "--rebuild-index",
        action="store_true",
        help="the index is missing or unreadable: set it aside and rebuild it from the blobs",
    )
    ap.add_argument("--version", action="version", version=f"weightcached {__version__}")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = dict(os.environ)
    try:
        cfg = config.load(
            env,
            args.config,
            {
                "cache_dir": args.cache_dir,
                "socket_dir": args.socket_dir,
                "admin_socket": args.admin_socket,
                "max_size": args.max_size,
                "log_format": args.log_format,
                "metrics_address": args.metrics_address,
            },
        )
    except WeightcacheError as exc:
        print(f"weightcached: {exc}", file=sys.stderr)
        sys.exit(2)
    logs.configure(cfg.log_format)
    # `kill -USR1 <pid>` dumps every thread's stack to stderr (journald): for a daemon that hangs.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    from weightcache_daemon.server import serve

    try:
        asyncio.run(serve(cfg, env, rebuild_index=args.rebuild_index))
    except WeightcacheError as exc:
        print(f"weightcached: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
