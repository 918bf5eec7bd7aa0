"""A guard that makes host reads of tensor values raise (tests/ops/test_no_host_sync.py and the
cache tests): Tensor.item / __bool__ / tolist / __int__ / __float__, and torch.tensor / torch.as_tensor
called from pefops' own code (on a GPU: a copy of Python data to the device per call).

On CPU every tensor is a host tensor, so a read that only ever happens for CPU tensors (a validation
behind `device.type == "cpu"`) would be flagged too: such call sites are listed in CPU_ONLY, by file
and function, each with the guard that keeps it off the GPU path. Reads made by Triton's interpreter
itself (it emulates the device) are not the op's."""

import contextlib
import os
import sys

import torch

# (path suffix, function): host reads guarded by a CPU-device test (never on a CUDA path)
CPU_ONLY = {
    # routing plan of a CPU adapter_index (`adapter_index.device.type == "cpu"`): range check, once per index
    ("pefops/ops/multi_adapter.py", "_check_host_index"),
    ("pefops/ops/multi_adapter.py", "_check_range"),
    ("pefops/ops/fusion_mix.py", "_check"),  # `if segment_offsets.device.type == "cpu"`: offsets check
    ("pefops/ops/masked_linear.py", "_host_int"),  # routing plan of a CPU row_task (`row_task.device.type == "cpu"`)
}
SYNC_METHODS = ("item", "__bool__", "tolist", "__int__", "__float__")
# tensors made from Python data: on a GPU each call is a host-to-device copy (pageable: a sync)
HOST_DATA_FACTORIES = ("tensor", "as_tensor")
TRITON_DIR = os.sep + "triton" + os.sep


def _allowed(frame) -> bool:
    filename = frame.f_code.co_filename.replace(os.sep, "/")
    if TRITON_DIR.replace(os.sep, "/") in filename and "/pefops/" not in filename:
        return True  # the interpreter's own emulation
    return any(filename.endswith(path) and frame.f_code.co_name == function for path, function in CPU_ONLY)


class HostSync(AssertionError):
    pass


def _in_pefops(frame) -> bool:
    import pefops

    return os.path.abspath(frame.f_code.co_filename).startswith(os.path.dirname(os.path.abspath(pefops.__file__)))


@contextlib.contextmanager
def no_host_sync(pefops_only: bool = False, allow: tuple = ()):
    """Make the host-reading Tensor methods raise HostSync unless called from an allowed site.
    pefops_only: flag only reads made by pefops' own code (a transformers model's own reads are its);
    allow: more (path suffix, function) sites the caller accounts for itself."""
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def guard(name):
        original = originals[name]

        def method(self, *args, **kwargs):
            caller = sys._getframe(1)
            allowed = _allowed(caller) or any(caller.f_code.co_filename.replace(os.sep, "/").endswith(path)
                                              and caller.f_code.co_name == function for path, function in allow)
            if not allowed and (not pefops_only or _in_pefops(caller)):
                raise HostSync(f"Tensor.{name} called from {caller.f_code.co_filename}:{caller.f_lineno} "
                               f"({caller.f_code.co_name}) on a {tuple(self.shape)} tensor")
            return original(self, *args, **kwargs)

        return method

    factories = {name: getattr(torch, name) for name in HOST_DATA_FACTORIES}

    def factory_guard(name):
        original = factories[name]

        def make(*args, **kwargs):
            caller = sys._getframe(1)
            filename = caller.f_code.co_filename.replace(os.sep, "/")
            if ("/pefops/" in filename or "/kernels/" in filename) and not _allowed(caller):
                raise HostSync(f"torch.{name} (a host-to-device copy of Python data on a GPU) called from "
                               f"{caller.f_code.co_filename}:{caller.f_lineno} ({caller.f_code.co_name})")
            return original(*args, **kwargs)

        return make

    for name in SYNC_METHODS:
        setattr(torch.Tensor, name, guard(name))
    for name in HOST_DATA_FACTORIES:
        setattr(torch, name, factory_guard(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        for name, original in factories.items():
            setattr(torch, name, original)
