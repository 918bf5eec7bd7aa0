"""What the tests of tests/csrc share: why the extension cannot be built here, and for the decode
kernels' tests the dtypes, the activation oracle, the tolerance of the float32 side results and a
misaligned copy of a tensor (to force the kernels' scalar path)."""

import pytest
import torch

from pefops import csrc

# The gpu tier: `pytestmark = GPU_TIER` in a test module.
GPU_TIER = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def build_skip_reason():
    """Why the CUDA extension cannot be built on this machine, or None."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build: the CUDA extension cannot be built"
    if csrc.find_cuda_home() is None:
        return "nvcc not found (set CUDA_HOME to a CUDA toolkit) : cannot build the CUDA extension"
    return None


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# z / mean / rstd are float32 results computed from exactly representable inputs.
TOL_F32_RESULTS = 1e-4
EPS = 1e-5
SLOPE = 0.07


def act_ref(z, code, slope):
    """The activation of code `code` (the Activation enum of csrc/common.cuh), in torch."""
    F = torch.nn.functional
    return [lambda v: v, torch.relu, F.gelu, lambda v: F.gelu(v, approximate="tanh"), F.silu, torch.tanh,
            lambda v: F.leaky_relu(v, slope)][code](z)


def misaligned_copy(t):
    """A contiguous copy of t that starts one element into its storage: not 16-byte aligned."""
    buf = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def layer_norm_params(H, dtype, generator, enabled):
    """(ln_weight, ln_bias) [H] on CUDA near (1, 0), or two empty tensors (no LayerNorm)."""
    if not enabled:
        empty = torch.empty(0, device="cuda", dtype=dtype)
        return empty, empty
    kw = dict(device="cuda", generator=generator)
    return (1.0 + 0.1 * torch.randn(H, **kw)).to(dtype), (torch.randn(H, **kw) * 0.1).to(dtype)


def eager_then_graph(fn):
    """Runs fn() once eagerly on a side stream (the warm-up, which also sets any shared-memory
    attributes outside capture), then captures fn() in a CUDA graph and replays it. Returns
    (eager result, replayed result)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    graph.replay()
    torch.cuda.synchronize()
    return eager, captured
