"""Reading checkpoints for the loaders: every error names the file (and the key), every check runs
before the model is touched. Safetensors only, except AdapterHub's `.bin` files, which are read
with torch.load(weights_only=True) (no arbitrary pickles)."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch


def read_json_object(path) -> dict:
    """A JSON file holding an object; ValueError naming the file for anything else."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object; it holds a {type(data).__name__}")
    return data


def field(data: dict, key: str, path, kinds, *, required: bool = True, default: Any = None,
          positive: bool = False) -> Any:
    """data[key] checked against `kinds` (a type or tuple; bool is never taken for int)."""
    if key not in data or data[key] is None:
        if required:
            raise ValueError(f"{path}: missing field {key!r}")
        return default
    value = data[key]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"{path}: field {key!r} must be {names}; got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{path}: field {key!r} must be positive; got {value!r}")
    return value


def read_safetensors(path, *, with_metadata: bool = False):
    """{key: tensor} (and the metadata) of a safetensors file; ValueError naming the file if it is
    missing, truncated or not safetensors."""
    from safetensors import safe_open

    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError, ...)
        raise ValueError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error})") from None
    return (tensors, metadata) if with_metadata else tensors


def read_pickled_tensors(path) -> dict:
    path = str(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a readable tensor file ({type(error).__name__}: {error})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise ValueError(f"{path} must hold a dict of named tensors")
    return data


def check_tensor(path, key: str, tensor: torch.Tensor, shape, *, dtype: Optional[torch.dtype] = None) -> None:
    """Exact shape (never broadcast) and dtype: `dtype`, or any floating dtype when None."""
    if dtype is not None:
        if tensor.dtype != dtype:
            raise ValueError(f"{path}: {key!r} has dtype {tensor.dtype}; expected {dtype}")
    elif not tensor.is_floating_point():
        raise ValueError(f"{path}: {key!r} has dtype {tensor.dtype}; expected a floating-point tensor")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{path}: {key!r} has shape {tuple(tensor.shape)}; the model needs {tuple(shape)}")


def check_names(path, found, expected, what: str) -> None:
    """The file's keys must be exactly the expected ones."""
    found, expected = set(found), set(expected)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all): not "
                         f"{what} of this model")
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} {what} tensors, e.g. {missing[:3]}")
