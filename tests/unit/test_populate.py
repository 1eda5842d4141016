"""The client's populate (MADV_POPULATE_READ/WRITE) lets other threads run while it waits.

A populate of cold pages waits for the disk. ``mmap.madvise`` holds the GIL for the whole
call, which stopped every other thread of a loading process meanwhile, the one queuing the
readahead of the same group included. The kernel's own mechanism makes the wait deterministic
here: a range registered with userfaultfd blocks the populate on its first page until someone
resolves the fault, and the only one who can is another Python thread of the same process.
If the populate held the GIL that thread would never run, and the child would hang (killed
after a generous limit: a deadlock, not a slow machine, is what fails the test).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    r"""
    import ctypes, errno, fcntl, mmap, os, platform, select, struct, sys, threading

    from weightcache._backing import MADV_POPULATE_READ, _populate

    NR = {"x86_64": 323, "aarch64": 282}.get(platform.machine())
    if NR is None:
        print("SKIP userfaultfd syscall number unknown on", platform.machine()); sys.exit(0)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    uffd = libc.syscall(NR, os.O_CLOEXEC | os.O_NONBLOCK)
    if uffd < 0:
        print("SKIP userfaultfd:", os.strerror(ctypes.get_errno())); sys.exit(0)

    def iowr(nr, size):
        return (3 << 30) | (size << 16) | (0xAA << 8) | nr

    fcntl.ioctl(uffd, iowr(0x3F, 24), struct.pack("QQQ", 0xAA, 0, 0))  # UFFDIO_API
    size = 64 * mmap.PAGESIZE
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
    fcntl.ioctl(uffd, iowr(0x00, 32), struct.pack("QQQQ", addr, size, 1, 0))  # UFFDIO_REGISTER, missing

    result = {}
    def populate():
        try:
            _populate(addr, addr + size, MADV_POPULATE_READ)
            result["ok"] = True
        except BaseException as e:
            result["error"] = repr(e)
    worker = threading.Thread(target=populate)
    worker.start()

    # This thread runs only if the populate let go of the GIL while it waits for the fault.
    if not select.select([uffd], [], [], 600)[0]:
        print("FAIL no fault reached the handler"); sys.exit(1)
    msg = os.read(uffd, 32)
    event, fault = msg[0], struct.unpack_from("Q", msg, 16)[0]
    assert event == 0x12 and addr <= fault < addr + size, (event, hex(fault), hex(addr))
    fcntl.ioctl(uffd, iowr(0x04, 32), struct.pack("QQQq", addr, size, 0, 0))  # UFFDIO_ZEROPAGE, wakes
    worker.join()
    assert result.get("ok"), result
    assert region[:] == bytes(size)
    print("OK")
    """
)


def test_populate_lets_other_threads_run_while_it_waits() -> None:
    try:
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail("the populate held the GIL: the thread that resolves its page fault never ran")
    if out.stdout.startswith("SKIP"):
        pytest.skip(out.stdout.strip())
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stdout + out.stderr
