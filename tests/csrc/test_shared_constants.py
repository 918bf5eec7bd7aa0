"""The constants the CUDA sources share with Python agree: csrc/common.cuh holds the activation enum,
kNumActivations and kMaxRank; kernels/shared.py holds the same codes and MAX_RANK for the Triton kernels
and the ops. Reads the header as text (no build needed), so it runs on every machine."""

import re
from pathlib import Path

from pefops.kernels import shared
from pefops.ops import activations

COMMON_CUH = Path(__file__).resolve().parents[2] / "csrc" / "common.cuh"

CUDA_NAMES = {"kIdentity": "IDENTITY", "kRelu": "RELU", "kGelu": "GELU", "kGeluTanh": "GELU_TANH", "kSilu": "SILU",
              "kTanh": "TANH", "kLeakyRelu": "LEAKY_RELU"}


def _header():
    return COMMON_CUH.read_text()


def _constexpr_int(text, name):
    match = re.search(rf"constexpr int {name} = (\d+);", text)
    assert match, f"{name} not found in {COMMON_CUH}"
    return int(match.group(1))


def test_activation_enum_matches_python_codes():
    body = re.search(r"enum Activation : int \{(.*?)\};", _header(), re.S)
    assert body, f"enum Activation not found in {COMMON_CUH}"
    cuda = {name: int(value) for name, value in re.findall(r"(k\w+) = (\d+)", body.group(1))}
    assert set(cuda) == set(CUDA_NAMES)
    for cuda_name, python_name in CUDA_NAMES.items():
        assert cuda[cuda_name] == getattr(shared, python_name), cuda_name
    assert _constexpr_int(_header(), "kNumActivations") == shared.NUM_ACTIVATIONS == len(set(cuda.values()))


def test_rank_limit_matches():
    assert _constexpr_int(_header(), "kMaxRank") == shared.MAX_RANK


def test_ops_take_the_shared_codes():
    for python_name in CUDA_NAMES.values():
        assert getattr(activations, python_name) == getattr(shared, python_name)
    assert sorted(set(activations.activation_code(name) for name in activations.NAMES)) == list(
        range(shared.NUM_ACTIVATIONS))
