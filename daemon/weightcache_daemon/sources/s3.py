"""s3://bucket/prefix/ sources through boto3 (AWS S3 and S3-compatible stores).

Endpoint, region and credentials come from the standard AWS chain unless the daemon
config has a ``[[sources]]`` entry for the URI's prefix; retries use botocore's
``standard`` mode. Every ranged GET carries ``If-Match: <ETag seen at listing>``.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Sequence
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config as BotoConfig

from weightcache.contract.errors import (
    DeadlineError,
    NotFoundError,
    PermissionDeniedError,
    SourceError,
    WeightcacheError,
)
from weightcache_daemon.config import SourceConfig
from weightcache_daemon.sources.base import ObjectChanged, RemoteObject, check_range, check_relpath, parse_uri

CHUNK = 1 << 20
_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "InvalidToken",
    "ExpiredToken",
    "403",
}
_MISSING = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}


def _error(exc: Exception, what: str) -> WeightcacheError:
    """One place that turns a boto error into our category, keeping the real text."""
    if isinstance(exc, botocore.exceptions.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _DENIED:
            return PermissionDeniedError(f"{what}: access denied ({exc})")
        if code in _MISSING:
            return NotFoundError(f"{what}: not found ({exc})")
        return SourceError(f"{what}: {exc}")
    if isinstance(exc, botocore.exceptions.ReadTimeoutError | botocore.exceptions.ConnectTimeoutError):
        return DeadlineError(f"{what}: timed out after the configured retries ({exc})")
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return PermissionDeniedError(f"{what}: no credentials found in the AWS chain or the daemon config")
    return SourceError(f"{what}: {type(exc).__name__}: {exc}")


def make_client(cfg: SourceConfig, concurrency: int) -> Any:
    """A boto3 S3 client for one source configuration (thread-safe; ~80 ms of CPU to build)."""
    session = boto3.session.Session(profile_name=cfg.profile) if cfg.profile else boto3.session.Session()
    proxies = {"http": cfg.proxy, "https": cfg.proxy} if cfg.proxy else None
    return session.client(
        "s3",
        endpoint_url=cfg.endpoint_url,
        region_name=cfg.region,
        aws_access_key_id=cfg.access_key_id,
        aws_secret_access_key=cfg.secret_access_key,
        config=BotoConfig(
            retries={"mode": "standard", "max_attempts": cfg.max_attempts},
            max_pool_connections=concurrency + 4,
            proxies=proxies,
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.read_timeout,
            s3={"addressing_style": "path"} if cfg.endpoint_url else None,
        ),
    )


class S3Source:
    """``client``: a client from make_client that the caller owns and keeps for later jobs
    (close() then leaves it open); by default the source builds its own and closes it."""

    def __init__(self, uri: str, cfg: SourceConfig, concurrency: int, client: Any = None) -> None:
        self.uri = uri
        _, self.bucket, prefix = parse_uri(uri)
        self.prefix = prefix if (not prefix or prefix.endswith("/")) else prefix + "/"
        self._owns_client = client is None
        self._client: Any = make_client(cfg, concurrency) if client is None else client
        self._lock = threading.Lock()

    def _obj_uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def list(self) -> list[RemoteObject]:
        out: list[RemoteObject] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    key: str = item["Key"]
                    if key.endswith("/") and item["Size"] == 0:
                        continue  # a "directory" marker
                    if not key.startswith(self.prefix):
                        raise SourceError(f"source {self.uri}: listing returned key {key!r} outside the prefix")
                    rel = check_relpath(key[len(self.prefix) :], self.uri)
                    out.append(RemoteObject(rel, int(item["Size"]), item["ETag"], self._obj_uri(key)))
        except WeightcacheError:
            raise
        except Exception as exc:  # noqa: BLE001 - every boto failure becomes a categorised error
            raise _error(exc, f"source {self.uri}: listing") from None
        out.sort(key=lambda o: o.relpath)  # S3 lists in key order; a compatible store might not
        return out

    def stat(self, relpath: str) -> RemoteObject:
        # every key is checked here too, not only at listing: a relpath never leaves the prefix
        key = self.prefix + check_relpath(relpath, self.uri)
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            raise _error(exc, f"source {self._obj_uri(key)}") from None
        return RemoteObject(relpath, int(head["ContentLength"]), head["ETag"], self._obj_uri(key))

    def read_into(self, obj: RemoteObject, offset: int, buf: memoryview, on_bytes: Callable[[int], None]) -> None:
        length = len(buf)
        key = self.prefix + check_relpath(obj.relpath, self.uri)
        check_range(obj, offset, length)
        if length == 0:
            return  # S3 has no empty range ("bytes=0--1" is invalid): nothing to fetch
        what = f"source {obj.uri} bytes {offset}-{offset + length - 1}"
        failure: Exception | None = None
        try:
            resp = self._client.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}", IfMatch=obj.version
            )
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            failure = ObjectChanged(obj) if code in ("PreconditionFailed", "412") else _error(exc, what)
        except Exception as exc:  # noqa: BLE001
            failure = _error(exc, what)
        if failure is not None:
            # raised here, not in the handler: there the boto error would become its __context__,
            # and that error's traceback holds the failed response, whose socket then stays open
            # after close() for as long as the caller keeps the exception (the engine keeps it)
            raise failure
        body = resp["Body"]
        if resp.get("ETag") not in (None, obj.version):
            body.close()
            raise ObjectChanged(obj)
        # readinto on the underlying urllib3 response lands the bytes straight in our
        # buffer (no bytes object per chunk, no extra copy); botocore's StreamingBody has
        # no readinto, and its length check is done here instead.
        raw = getattr(body, "_raw_stream", None)
        got = 0
        try:
            while got < length:
                view = buf[got : got + CHUNK]
                if raw is not None and hasattr(raw, "readinto"):
                    n = raw.readinto(view)
                else:
                    data = body.read(len(view))
                    n = len(data)
                    view[:n] = data
                if not n:
                    break
                got += n
                on_bytes(n)
        except Exception as exc:  # noqa: BLE001 - a body cut mid-stream is a transient source error
            raise _error(exc, what) from None
        finally:
            body.close()
        if got != length:
            raise SourceError(f"{what}: the response ended after {got} of {length} bytes")

    def expected_sha256(self, objects: Sequence[RemoteObject]) -> dict[str, str]:
        """Full-object SHA256 checksums (objects uploaded with ChecksumAlgorithm=SHA256): the
        downloaded bytes must hash to them, which catches same-length corruption in transit, and
        a checksum already in the store means no download at all. HEADs run in parallel; an
        object without one (or a HEAD that fails) is simply not vouched for."""
        from concurrent.futures import ThreadPoolExecutor

        def one(o: RemoteObject) -> tuple[str, str | None]:
            try:
                head = self._client.head_object(Bucket=self.bucket, Key=self.prefix + o.relpath, ChecksumMode="ENABLED",
                                                IfMatch=o.version)  # fmt: skip
            except Exception:  # noqa: BLE001 - no checksum is not an error
                return o.relpath, None
            value = head.get("ChecksumSHA256")
            if not value or "-" in value or head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
                return o.relpath, None  # composite (multipart) checksums are not the file's sha256
            try:
                return o.relpath, base64.b64decode(value).hex()
            except ValueError:
                return o.relpath, None

        with ThreadPoolExecutor(max_workers=8) as ex:
            return {rel: sha for rel, sha in ex.map(one, objects) if sha and len(sha) == 64}

    def close(self) -> None:
        if self._owns_client:
            self._client.close()
