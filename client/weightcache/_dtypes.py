"""safetensors dtype names -> torch dtypes (torch imported only when tensors are asked for)."""

from __future__ import annotations

from typing import Any

from .contract.errors import InvalidInputError

_TORCH_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}


def torch_module() -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError("weightcache: tensors need PyTorch (pip install torch); raw bytes work without it") from None
    return torch


def torch_dtype(dtype: str) -> Any:
    torch = torch_module()
    name = _TORCH_NAMES.get(dtype)
    if name is None or not hasattr(torch, name):
        raise InvalidInputError(f"dtype {dtype} has no torch equivalent in torch {torch.__version__}")
    return getattr(torch, name)
