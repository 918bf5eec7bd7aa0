"""Facts about the machine and the run: dtype names, the device's name and slug, library versions,
timestamps, load average; and the device housekeeping between measurements."""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import re

import torch

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp64": torch.float64, "float64": torch.float64,
}



def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise SystemExit(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}") from None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def device_slug(device: str, name: str | None = None) -> str:
    """"cuda-nvidia-h200", "cpu-intel-xeon": the device kind and a cleaned model name."""
    name = name or device_name(device)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    clean = re.sub(r"\((r|tm|c)\)|@.*$", " ", name.lower())
    words = [w for w in re.split(r"[^a-z0-9]+", clean) if w and w not in ("cpu", "processor", "corporation")]
    return "-".join([kind] + words)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__, "triton": None, "pefops": None}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional here
        pass
    try:
        import pefops

        out["pefops"] = getattr(pefops, "__version__", "unknown")
    except Exception as error:  # noqa: BLE001
        out["pefops"] = f"not importable ({type(error).__name__}: {error})"[:200]
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()



def file_stamp() -> str:
    """now_iso() as it goes into a file name: 20261205T162606Z."""
    return now_iso().replace(":", "").replace("-", "").replace("+0000", "Z")


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine makes CPU timings noisy."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def free_memory(device: str) -> None:
    """Collect what the last configuration left behind, so the next one starts from the same state."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
