"""A script that holds a model's path and runs a multiprocessing child exits (no vLLM needed).

vLLM's ``LLM`` starts its engine as a non-daemonic multiprocessing child and stops it from a
``weakref.finalize``. The child below does the same in a few lines: it runs until its parent
says stop, and the parent says so only from a finalizer run at exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from harness import Daemon

# Reading model.path creates the path directory's finalizer before the script imports
# multiprocessing, which is what once made the exit wait forever for the child.
SCRIPT = textwrap.dedent("""
    import sys, weightcache
    client = weightcache.connect(sys.argv[1])
    model = client.open(sys.argv[2])
    path = model.path

    import multiprocessing, weakref

    def engine(conn):
        conn.recv()  # runs until told to stop, like an engine core

    def stop(conn, proc):
        conn.send("stop")
        proc.join()

    class Engine:
        def __init__(self):
            ctx = multiprocessing.get_context("spawn")
            ours, theirs = ctx.Pipe()
            self.proc = ctx.Process(target=engine, args=(theirs,))
            self.proc.start()
            weakref.finalize(self, stop, ours, self.proc)

    if __name__ == "__main__":
        llm = Engine()  # held to the end, like a script's LLM(...)
        print("started", path, flush=True)
""")


def test_script_with_model_path_and_a_multiprocessing_child_exits(
    daemon: Daemon, tiny_model: Path, tmp_path: Path
) -> None:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    r = subprocess.run(
        [sys.executable, str(script), str(daemon.socket_dir), f"file://{tiny_model}/"],
        capture_output=True,
        text=True,
        timeout=180,  # a hang, not slowness: the script itself takes a second or two
    )
    assert r.returncode == 0, r.stderr[-3000:]
    path = r.stdout.split("started ", 1)[1].strip()
    assert path and not Path(path).exists()  # the path directory was removed at exit all the same
