"""Declarative models: ``*.toml`` files in ``models_dir`` (``models.d/``), watched with watchdog.

    uri = "s3://models/llama-8b/"   # required
    name = "llama-8b"               # default: the URI's last path component
    pin = true                      # default: true
    include = ["*.safetensors", "*.json"]
    exclude = []

A new or changed file prefetches (and pins) its model; a removed file unpins it (the model
stays until evicted); an invalid file is logged with the rule it broke and the others are
unaffected. Existing files are applied at start-up.
"""

from __future__ import annotations

import asyncio
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from weightcache.contract.errors import InvalidInputError, WeightcacheError
from weightcache_daemon import uris
from weightcache_daemon.cache.core import Core
from weightcache_daemon.cache.naming import check_name, default_name

log = structlog.get_logger("weightcached.models_d")


@dataclass(frozen=True)
class Declared:
    uri: str
    name: str
    pin: bool
    include: tuple[str, ...]
    exclude: tuple[str, ...]


def parse(path: Path) -> Declared:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"models.d file {path}: cannot read it ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInputError(f"models.d file {path}: not valid TOML ({exc})") from None
    extra = set(data) - {"uri", "name", "pin", "include", "exclude"}
    if extra:
        raise InvalidInputError(f"models.d file {path}: unknown key(s) {', '.join(sorted(extra))}")
    uri = data.get("uri")
    if not isinstance(uri, str) or not uri:
        raise InvalidInputError(f'models.d file {path}: needs uri = "s3://bucket/prefix/" (or file:///dir/)')
    uri = uris.normalize(uri)  # the same canonical form as every other entry
    name = data.get("name", default_name(uri))
    if not isinstance(name, str):
        raise InvalidInputError(f"models.d file {path}: name must be a string")
    check_name(name)
    pin = data.get("pin", True)
    if not isinstance(pin, bool):
        raise InvalidInputError(f"models.d file {path}: pin must be true or false")
    lists: dict[str, tuple[str, ...]] = {}
    for key in ("include", "exclude"):
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidInputError(f"models.d file {path}: {key} must be a list of globs")
        lists[key] = tuple(value)
    return Declared(uri, name, pin, lists["include"], lists["exclude"])


class ModelsDir:
    def __init__(self, core: Core, directory: Path) -> None:
        self.core = core
        self.directory = directory
        self.declared: dict[Path, Declared] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._observer: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        from watchdog.observers import Observer

        self._loop = asyncio.get_running_loop()
        self.directory.mkdir(parents=True, exist_ok=True)
        for p in sorted(self.directory.glob("*.toml")):
            self.apply(p)
        handler = _Handler(self)
        self._observer = Observer()
        self._observer.schedule(handler, str(self.directory), recursive=False)
        self._observer.daemon = True
        self._observer.start()
        log.info("models_dir_watched", path=str(self.directory), models=len(self.declared))

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        for t in self.tasks:
            t.cancel()

    def notify(self, path: str) -> None:
        """From the watchdog thread: hand the path to the event loop."""
        p = Path(path)
        if p.suffix == ".toml" and not p.name.startswith(".") and self._loop is not None:
            self._loop.call_soon_threadsafe(self.apply, p)

    def apply(self, path: Path) -> None:
        if not path.exists():
            old = self.declared.pop(path, None)
            if old is not None:
                try:
                    self.core.set_pin(old.name, False)
                    log.info("models_d_removed", file=str(path), model=old.name, action="unpinned")
                except WeightcacheError as exc:
                    log.info("models_d_removed", file=str(path), model=old.name, note=str(exc))
            return
        try:
            spec = parse(path)
        except WeightcacheError as exc:
            log.error("models_d_invalid", file=str(path), error=str(exc))
            return
        if self.declared.get(path) == spec:
            return  # a touch without a change
        self.declared[path] = spec
        log.info("models_d_apply", file=str(path), model=spec.name, source=spec.uri, pin=spec.pin)
        task = asyncio.get_running_loop().create_task(self.core.run_prefetch(
            spec.uri, spec.name, list(spec.include), list(spec.exclude), spec.pin, f"models.d {path.name}",
            "models.d"))  # fmt: skip
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class _Handler:
    """watchdog event handler (duck-typed: watchdog calls dispatch)."""

    def __init__(self, owner: ModelsDir) -> None:
        self.owner = owner

    # Only changes: reading a file ourselves raises "opened"/"closed_no_write" events, which
    # must not trigger another read.
    CHANGES = frozenset({"created", "modified", "moved", "deleted", "closed"})

    def dispatch(self, event: Any) -> None:
        if getattr(event, "is_directory", False) or getattr(event, "event_type", "") not in self.CHANGES:
            return
        for attr in ("src_path", "dest_path"):
            p = getattr(event, attr, "")
            if p:
                self.owner.notify(p if isinstance(p, str) else p.decode())
