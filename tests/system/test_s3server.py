"""The test S3 server (tools/s3server.py) never outlives the process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from harness import wait_for

TOOLS = Path(__file__).resolve().parents[2] / "tools"

# A parent that starts a server, says its pid, and waits to be killed.
PARENT = """
import sys
from pathlib import Path
import s3server
srv = s3server.start(Path(sys.argv[1]))
print(srv.process.pid, flush=True)
sys.stdin.read()
"""


def _started(pid: int) -> str | None:
    """The start time of a live process, None once it is gone or only a zombie. The start time
    tells a reused pid from the server."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3, starttime 22
    return None if fields[0] in ("Z", "X") else fields[19]


def test_server_dies_when_its_parent_is_killed(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TOOLS), os.environ.get("PYTHONPATH", "")]))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "s3")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=env, text=True)  # fmt: skip
    server, alive = 0, None
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()  # returns at once with "" if the parent failed
        assert line.strip().isdigit(), f"the parent did not start a server (exit {parent.poll()}): {line!r}"
        server = int(line)
        alive = _started(server)
        assert alive is not None, "the server exited by itself"
        parent.kill()  # SIGKILL: no atexit, no fixture teardown, nothing of the parent runs
        parent.wait()
        wait_for(lambda: _started(server) != alive, 60, f"weed mini (pid {server}) to exit after its parent died")
    finally:
        parent.kill()
        parent.wait()
        if alive is not None and _started(server) == alive:
            os.kill(server, signal.SIGKILL)  # the test failed: leave no server behind
