"""The vLLM launcher's and load format's parts that need no vLLM: options, and the directory
vLLM is started on (a cached model's path; a downloading model's configuration files)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from harness import Daemon, make_model, start_daemon

import weightcache
from weightcache.errors import InvalidInputError
from weightcache.vllm import LOAD_FORMAT, LoaderOptions, prepare


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
