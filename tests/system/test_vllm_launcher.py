"""The vLLM launcher's and load format's parts that need no vLLM: options, and the directory
vLLM is started on (a cached model's path; a downloading model's configuration files)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy
from harness import Daemon, make_model, s3_source, start_daemon, wait_for, write_config

import weightcache
from weightcache.errors import CorruptedError, InvalidInputError
from weightcache.vllm import LOAD_FORMAT, LoaderOptions, prepare, serve


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ("llama", "must be a JSON object, got str"),
        ({}, 'needs "model"'),
        ({"model": ""}, 'needs "model"'),
        ({"model": "m", "sockets": "/x"}, r"unknown keys \['sockets'\]; known: model"),
        ({"model": "m", "socket_dir": 3}, '"socket_dir" must be a non-empty string, got 3'),
        ({"model": "m", "enable_weights_track": "yes"}, '"enable_weights_track" must be true or false'),
    ],
)
def test_loader_options_refuse_bad_input_naming_it(extra: object, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        LoaderOptions.parse(extra)


def test_loader_options_round_trip() -> None:
    opts = LoaderOptions("llama-8b", "/run/wc", False)
    assert LoaderOptions.parse(opts.to_config()) == opts
    assert LoaderOptions.parse({"model": "x"}) == LoaderOptions("x")


def test_a_cached_model_is_served_from_its_path_by_snapshot_id(daemon: Daemon, tiny_model: Path) -> None:
    uri = f"file://{tiny_model}/"
    with weightcache.connect(daemon.socket_dir) as c:
        c.ensure(uri)
        with prepare(uri, client=c) as p:
            assert not p.streaming and p.path == p.handle.path
            assert p.options == LoaderOptions(p.handle.snapshot_id, str(c.socket_dir))
            args = p.server_args()
            assert args[:4] == ["--model", p.path, "--load-format", LOAD_FORMAT]
            assert json.loads(args[5]) == {"model": p.handle.snapshot_id, "socket_dir": str(c.socket_dir)}
            assert p.llm_kwargs()["model_loader_extra_config"] == p.loader_config()
            path = p.path
        assert not os.path.exists(path)  # the lease and its directory went with the block


def test_a_downloading_model_gets_its_config_files_first(tmp_path: Path) -> None:
    """Throttled so the download is still running when prepare() returns: the directory holds
    the configuration files (byte for byte), no weights, and goes away with the block."""
    model = make_model(tmp_path / "m", tiny=False, size=4 << 20, shards=2)
    d = start_daemon(tmp_path / "d", None, download={"rate_limit": "512KiB", "part_size": "1MiB"})
    try:
        uri = f"file://{model}/"
        with prepare(uri, socket_dir=str(d.socket_dir)) as p:
            assert p.streaming and not p.handle.complete()
            assert p.options.model == uri
            names = sorted(os.listdir(p.path))
            expected = sorted(f.name for f in model.iterdir() if not f.name.endswith(".safetensors"))
            assert names == expected and "config.json" in names
            for name in names:
                assert (Path(p.path) / name).read_bytes() == (model / name).read_bytes()
            assert os.stat(p.path).st_mode & 0o777 == 0o700
            directory = p.path
        assert not os.path.exists(directory)
    finally:
        d.stop()


@pytest.fixture
def proxy(s3: Any) -> Iterator[FaultProxy]:
    p = FaultProxy(int(s3.endpoint.rsplit(":", 1)[1])).start()
    yield p
    p.stop()


def test_a_download_failing_verification_stops_the_server(
    tmp_path: Path, s3: Any, bucket: str, proxy: FaultProxy
) -> None:
    """serve() started the server while the model downloads; a byte flipped in transit fails
    verification, and the launcher stops the server and raises. The server here is a stand-in
    (a process that waits to be stopped): what is under test is the launcher's reaction; vLLM's
    own load fails on the same error, raised by Model.stream (tests/system/test_cold_stream.py)."""
    model = make_model(tmp_path / "m", tiny=False, size=16 << 20, shards=2)
    c3 = s3.client()
    for p in sorted(model.iterdir()):
        c3.put_object(Bucket=bucket, Key=f"llama/{p.name}", Body=p.read_bytes(), ChecksumAlgorithm="SHA256")
    root = tmp_path / "d"
    root.mkdir()
    cfg = write_config(root / "w.toml", None, client_sources=["*"],
                       download={"concurrency": 2, "part_size": "1MiB", "rate_limit": "2MiB"},
                       sources=[s3_source(s3, endpoint_url=f"http://127.0.0.1:{proxy.port}")])  # fmt: skip
    d = start_daemon(root, s3, config=cfg)
    started = tmp_path / "started"
    server = tmp_path / "server.sh"
    server.write_text(f'#!/bin/sh\necho "$@" > {started}\nexec sleep 600\n')
    server.chmod(0o755)
    outcome: list[Exception | int] = []

    def run() -> None:
        try:
            outcome.append(
                serve(f"s3://{bucket}/llama/", ["--port", "1"], socket_dir=str(d.socket_dir), python=str(server))
            )
        except Exception as exc:  # noqa: BLE001  # handed to the test thread, which checks its type
            outcome.append(exc)

    thread = threading.Thread(target=run)
    try:
        thread.start()
        wait_for(lambda: (started.exists() and started.read_text() != "") or bool(outcome), 300, "the server to start")
        assert not outcome, outcome
        args = started.read_text().split()
        assert args[:2] == ["-m", "vllm.entrypoints.openai.api_server"] and "--port" in args
        proxy.set(corrupt=True, times=10_000)  # every object read from now on has one byte flipped
        thread.join(timeout=300)
        assert not thread.is_alive(), "serve() did not return after the download failed"
        assert len(outcome) == 1 and isinstance(outcome[0], CorruptedError), outcome
    finally:
        proxy.clear()
        thread.join(timeout=300)
        d.stop()


def test_the_plugin_hook_warns_instead_of_crashing_a_vllm_it_cannot_serve(caplog: pytest.LogCaptureFixture) -> None:
    """vLLM calls every installed plugin without catching errors: where the loader interface
    cannot be imported (here: no vLLM in this environment), register() warns and returns."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: register() registers for real (tests/system/test_vllm.py)")
    from weightcache.vllm import register

    with caplog.at_level("WARNING", logger="vllm.weightcache"):
        register()
    assert "load format 'weightcache' not registered" in caplog.text and "vllm" in caplog.text
