"""Shared fixtures: a real SeaweedFS S3 server on loopback (one per session) and real
weightcached daemons as subprocesses on temp directories and sockets."""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
# The helpers the suites share (llama.py, hf_zoo.py, tests_helpers.py) live beside this file;
# the suites themselves are in unit/ (in one process, on fakes) and system/ (real daemons).
sys.path.insert(0, str(ROOT / "tests"))

import s3server  # noqa: E402
from harness import Daemon, make_model, start_daemon, upload_dir  # noqa: E402


@pytest.fixture(scope="session")
def s3() -> Iterator[s3server.S3Server]:
    server = s3server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3: s3server.S3Server) -> Iterator[str]:
    name = f"wc-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    yield name
    # SeaweedFS gives every bucket volumes of its own, out of a fixed number per server: a
    # suite that left each test's bucket behind runs out of writable volumes part-way through.
    s3.remove_bucket(name)


@pytest.fixture
def daemon_factory(tmp_path: Path, s3: s3server.S3Server) -> Iterator[Any]:
    started: list[Daemon] = []

    def factory(name: str = "d", **cfg: Any) -> Daemon:
        d = start_daemon(tmp_path / name, s3, **cfg)
        started.append(d)
        return d

    yield factory
    for d in started:
        d.stop()


@pytest.fixture
def daemon(daemon_factory: Any) -> Daemon:
    return daemon_factory()  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def s3_model(s3: s3server.S3Server, bucket: str, tiny_model: Path) -> str:
    upload_dir(s3, bucket, "models/tiny-llama/", tiny_model)
    return f"s3://{bucket}/models/tiny-llama/"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip cleanly on machines without a CUDA device (CI, development machines)."""
    try:
        import torch

        has_cuda = bool(torch.cuda.is_available())
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------- the suite's own report
# Tests that put the daemon through something call report(case, what, result, figures); at the
# end of the session the rows are written to $WC_SUITE_REPORT (tools/suite_report.py turns them
# into docs/test-report.md), so the table is the suite's output, not a hand-written claim.
_REPORT: list[dict[str, str]] = []


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Any:
    def add(case: str, what: str, result: str, figures: str = "") -> None:
        _REPORT.append({"case": case, "what": what, "result": result, "figures": figures,
                        "test": request.node.nodeid})  # fmt: skip

    return add


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    out = os.environ.get("WC_SUITE_REPORT")
    if out and _REPORT:
        Path(out).write_text(json.dumps(_REPORT, indent=1))
