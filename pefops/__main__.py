"""`python -m pefops`: versions, devices, and which backend serves each op and why."""

from __future__ import annotations

import importlib
import platform

import torch

import pefops
from pefops import backend as backends

# A representative call per op for the report: (tokens, hidden, rank) sizes.
_REPORT_SIZES = {
    "bottleneck_adapter": [{"tokens": 8, "hidden": 4096, "rank": 64}, {"tokens": 16384, "hidden": 4096, "rank": 64}],
    "masked_linear": [{"rows": 1, "out_features": 4096, "in_features": 4096, "weight_contiguous": 1},
                      {"rows": 2048, "out_features": 4096, "in_features": 4096, "weight_contiguous": 1}],
}


def _version(module_name: str) -> str:
    try:
        return getattr(importlib.import_module(module_name), "__version__", "installed")
    except ImportError:
        return "not installed"


def report() -> str:
    lines = [f"pefops {pefops.__version__}  (python {platform.python_version()}, {platform.machine()})"]
    for name in ("torch", "triton", "transformers", "safetensors"):
        lines.append(f"  {name:<13} {_version(name)}")
    cuda = torch.cuda.is_available()
    lines.append(f"  torch CUDA    {torch.version.cuda or 'none (CPU build)'}")
    devices = [torch.device("cpu")]
    if cuda:
        for index in range(torch.cuda.device_count()):
            lines.append(f"  device cuda:{index}  {torch.cuda.get_device_name(index)}")
        devices.append(torch.device("cuda"))
    else:
        lines.append("  devices       cpu only (no CUDA device visible)")
    from pefops import csrc

    reasons = csrc.unavailable_reasons()
    lines.append(f"  csrc          {'can be built/loaded' if not reasons else '; '.join(reasons)}")
    lines.append(f"  TRITON_INTERPRET={'1' if backends.triton_interpreter_enabled() else '0'}"
                 f"  PEFOPS_BACKEND={backends.forced_backend() or 'auto'}")
    lines.append("")
    lines.append("backend per op (selection order cuda → triton → torch):")
    for op in backends.registered_ops():
        for device in devices:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            for sizes in _REPORT_SIZES.get(op, [{}]):
                for mode in ("forward", "backward"):
                    problem = backends.Problem(device, dtype, mode, sizes)
                    shape = " ".join(f"{k}={v}" for k, v in sizes.items())
                    try:
                        chosen = backends.select(op, problem).backend
                    except backends.BackendNotSupportedError as error:
                        chosen = f"none ({error})"
                    lines.append(f"  {op} {mode} on {device.type}/{str(dtype).removeprefix('torch.')} [{shape}]: {chosen}")
                    for name, why in backends.explain(op, problem):
                        if why and name != chosen:
                            lines.append(f"      not {name}: {'; '.join(why)}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
