"""A fault-injecting TCP proxy for HTTP (S3) traffic on loopback, for the fault tests.

    proxy = FaultProxy(upstream_port).start()      # runs its own event loop in a thread
    proxy.set(truncate_after=300_000, times=3)     # the next 3 connections are cut after 300 kB
    ... point the daemon's endpoint_url at f"http://127.0.0.1:{proxy.port}" ...
    proxy.stop()

Faults (each applies to the next `times` requests, then traffic passes untouched; connections
are kept alive, so every request on one is counted, and each response gets the fault afresh):
  truncate_after=N   close the connection after N response bytes
  reset_after=N      reset it (RST) after N response bytes
  stall_after=N      stop forwarding after N response bytes, for `stall_seconds`
  throttle=R         forward responses at R bytes/s
  slowdown=True      answer the request with HTTP 503 SlowDown without contacting the server
  corrupt=True       flip one body byte of the response, the 101st (same length: only a hash
                     catches it), however the response is cut into reads
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

_SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
SLOWDOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
    + f"Content-Length: {len(_SLOWDOWN_BODY)}\r\n\r\n".encode()
    + _SLOWDOWN_BODY
)


@dataclass
class Fault:
    truncate_after: int | None = None
    reset_after: int | None = None
    stall_after: int | None = None
    stall_seconds: float = 30.0
    throttle: int | None = None
    slowdown: bool = False
    corrupt: bool = False
    only_ranged: bool = True  # act only on connections whose first request is a ranged GET (object data)


@dataclass
class FaultProxy:
    upstream_port: int
    upstream_host: str = "127.0.0.1"
    port: int = 0
    injected: int = 0
    connections: int = 0
    _fault: Fault = field(default_factory=Fault)
    _times: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None
    _server: asyncio.AbstractServer | None = None
    _thread: threading.Thread | None = None

    def set(self, times: int = 1, **fault: object) -> FaultProxy:
        with self._lock:
            self._fault = Fault(**fault)  # type: ignore[arg-type]
            self._times = times
        return self

    def clear(self) -> None:
        self.set(times=0)

    def _take(self, first_request: bytes) -> Fault | None:
        with self._lock:
            if self._times <= 0:
                return None
            if self._fault.only_ranged and not (
                first_request.startswith(b"GET") and b"\nrange:" in first_request.lower()
            ):
                return None
            self._times -= 1
            self.injected += 1
            return self._fault

    def start(self) -> FaultProxy:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._server = loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            # stopped: end every connection handler before the loop goes, so nothing outlives it
            pending = asyncio.all_tasks(loop)
            for t in pending:
                t.cancel()
            if pending:  # gather() of nothing looks for a current loop, and this thread has none
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name="faultproxy")
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        state: dict[str, object] = {"fault": None}
        try:
            first = await reader.read(65536)
            if not first:
                return
            if self._arm(first, state) and state["fault"].slowdown:  # type: ignore[union-attr]
                writer.write(SLOWDOWN)
                await writer.drain()
                return
            up_r, up_w = await asyncio.open_connection(self.upstream_host, self.upstream_port)
            up_w.write(first)
            await up_w.drain()
            to_server = asyncio.ensure_future(self._pump(reader, up_w, writer, state))
            try:
                await self._downstream(up_r, writer, state)
            finally:
                to_server.cancel()
                up_w.close()
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            try:
                writer.close()
            except OSError:
                pass

    def _arm(self, request: bytes, state: dict[str, object]) -> bool:
        """A new request on this connection: its response gets a fault from the budget if it
        qualifies, and none otherwise. Connections are kept alive, so requests are looked at one
        by one, not per connection (a client sends the next only after reading a response)."""
        if not request.startswith((b"GET ", b"HEAD ", b"PUT ", b"POST ", b"DELETE ")):
            return False  # the middle of a request body
        fault = self._take(request)
        # body_at: where the response's body starts, counted like `sent`, once its head is seen
        state.update(fault=fault, sent=0, start=time.monotonic(), corrupted=False, body_at=None)
        return fault is not None

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, client: asyncio.StreamWriter,
                    state: dict[str, object]) -> None:  # fmt: skip
        while data := await src.read(65536):
            if self._arm(data, state) and state["fault"].slowdown:  # type: ignore[union-attr]
                client.write(SLOWDOWN)
                await client.drain()
                client.close()
                return
            dst.write(data)
            await dst.drain()

    async def _downstream(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, state: dict[str, object]) -> None:
        while data := await src.read(65536):
            fault = state["fault"]
            if isinstance(fault, Fault):
                sent = int(state["sent"])  # type: ignore[call-overload]
                if fault.corrupt and not state["corrupted"]:
                    if state["body_at"] is None and (head_end := data.find(b"\r\n\r\n")) >= 0:
                        state["body_at"] = sent + head_end + 4
                    if state["body_at"] is not None:
                        i = int(state["body_at"]) + 100 - sent  # type: ignore[call-overload]
                        if 0 <= i < len(data):
                            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
                            state["corrupted"] = True
                for limit, action in ((fault.truncate_after, "truncate"), (fault.reset_after, "reset"),
                                      (fault.stall_after, "stall")):  # fmt: skip
                    if limit is not None and sent + len(data) > limit:
                        dst.write(data[: max(limit - sent, 0)])
                        await dst.drain()
                        if action == "stall":
                            await asyncio.sleep(fault.stall_seconds)
                        elif action == "reset":
                            sock = dst.get_extra_info("socket")
                            if sock is not None:
                                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return
                if fault.throttle:
                    wait = (sent + len(data)) / fault.throttle - (time.monotonic() - float(state["start"]))  # type: ignore[arg-type]
                    if wait > 0:
                        await asyncio.sleep(wait)
                state["sent"] = sent + len(data)
            dst.write(data)
            await dst.drain()
