"""Small fixture writers shared by tests."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np


def write_u8_safetensors(path: Path, size: int, seed: int) -> None:
    """One U8 tensor 'w' of `size` random bytes."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.write(np.random.default_rng(seed).bytes(size))


def write_u8_model(directory: Path, size: int, seed: int) -> Path:
    """A small model of distinct content: one safetensors file of `size` bytes plus a config."""
    directory.mkdir(parents=True, exist_ok=True)
    write_u8_safetensors(directory / "model.safetensors", size, seed)
    (directory / "config.json").write_text(json.dumps({"seed": seed}))
    return directory
