"""Reference tier for mixed-task batches (pefops.ops.multi_adapter): the torch path against a naive
per-row loop over pefops.ops.bottleneck_adapter_ref (in float64) with each row's own adapter,
float64 gradcheck, adapters without rows, the custom-op contract (opcheck, torch.compile) and
argument errors. The helpers here serve tests/kernels/test_multi_adapter_triton.py too."""

import importlib
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from pefops import backend as backends
from pefops.ops import bottleneck_adapter_ref, multi_adapter, multi_adapter_ref
from tests.tolerances import assert_close
from pefops.ops import adapter_call

multi_adapter_module = importlib.import_module("pefops.ops.multi_adapter")  # the module, not the function

ACTIVATIONS = ["relu", "gelu", "gelu_new", "silu", "tanh", "leaky_relu", "identity"]
SCALINGS = ["float", "shared", "adapter", "channel"]


@dataclass
class MultiCase:
    batch: int  # sequences (or rows, when seq == 0)
    seq: int  # rows per sequence; 0: x is [batch, hidden] with one index per row
    hidden: int
    rank: int
    adapters: int
    dtype: torch.dtype = torch.float32
    activation: str = "relu"
    scaling: str = "float"  # float | shared (one-element tensor) | adapter ([N]) | channel ([N, H])
    layer_norm: bool = False
    ln_affine: bool = True
    separate_residual: bool = False
    biases: bool = True
    index: str = "random"  # random | first (all rows adapter 0) | last | skip (odd adapters get no rows) | tokens
    device: str = "cpu"

    def __str__(self):
        dtype = str(self.dtype).removeprefix("torch.")
        shape = f"B{self.batch}-S{self.seq}" if self.seq else f"rows{self.batch}"
        return (f"{shape}-H{self.hidden}-r{self.rank}-N{self.adapters}-{dtype}-{self.activation}-s_{self.scaling}"
                f"-idx_{self.index}{'-ln' if self.layer_norm else ''}{'-res' if self.separate_residual else ''}"
                f"{'' if self.biases else '-nobias'}")


def make_index(case: MultiCase, generator) -> torch.Tensor:
    shape = (case.batch, case.seq) if case.index == "tokens" else (case.batch,)
    if case.index == "first":
        index = torch.zeros(shape, dtype=torch.int64)
    elif case.index == "last":
        index = torch.full(shape, case.adapters - 1, dtype=torch.int64)
    elif case.index == "skip":
        index = torch.randint(0, (case.adapters + 1) // 2, shape, generator=generator) * 2
    else:
        index = torch.randint(0, case.adapters, shape, generator=generator)
    return index.to(case.device)


def make_inputs(case: MultiCase, seed: int = 0):
    """(leaf tensors by name, adapter_index, keyword arguments of multi_adapter)."""
    generator = torch.Generator().manual_seed(seed)

    def leaf(*shape, std=0.5, dtype=None):
        t = torch.randn(*shape, generator=generator, dtype=torch.float64) * std
        return t.to(dtype or case.dtype).to(case.device).requires_grad_()

    n, r, h = case.adapters, case.rank, case.hidden
    shape = (case.batch, case.seq, h) if case.seq else (case.batch, h)
    inputs = {
        "x": leaf(*shape),
        "down_weight": leaf(n, r, h, std=h ** -0.5),
        "down_bias": leaf(n, r, std=0.1) if case.biases else None,
        "up_weight": leaf(n, h, r, std=r ** -0.5),
        "up_bias": leaf(n, h, std=0.1) if case.biases else None,
    }
    scale_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    kwargs = {"activation": case.activation}
    if case.scaling == "float":
        kwargs["scaling"] = 0.75
    else:
        scale_shape = {"shared": (1,), "adapter": (n,), "channel": (n, h)}[case.scaling]
        kwargs["scaling"] = inputs["scaling"] = leaf(*scale_shape, std=1.0, dtype=scale_dtype)
    if case.separate_residual:
        kwargs["residual"] = inputs["residual"] = leaf(*shape)
    if case.layer_norm:
        weight = inputs["ln_weight"] = leaf(h) if case.ln_affine else None
        bias = inputs["ln_bias"] = leaf(h, std=0.1) if case.ln_affine else None
        kwargs["layer_norm"] = (weight, bias, 1e-5)
    return inputs, make_index(case, generator), kwargs


def naive_multi_adapter(x, adapter_index, down_weight, down_bias, up_weight, up_bias, *, activation="relu",
                        scaling=1.0, residual=None, layer_norm=None):
    """A loop over rows: each row through bottleneck_adapter_ref with its own adapter, in float64."""
    d = torch.float64
    opt = lambda t: None if t is None else t.to(d)  # noqa: E731
    hidden = x.shape[-1]
    per_row = adapter_index.reshape(*adapter_index.shape, *([1] * (x.dim() - 1 - adapter_index.dim())))
    per_row = per_row.expand(x.shape[:-1]).reshape(-1).tolist()
    rows = x.reshape(-1, hidden).to(d)
    residual_rows = None if residual is None else residual.reshape(-1, hidden).to(d)
    ln = None if layer_norm is None else (opt(layer_norm[0]), opt(layer_norm[1]), layer_norm[2])
    outs = []
    for t, i in enumerate(per_row):
        if isinstance(scaling, torch.Tensor):
            s = scaling.to(d).reshape(-1) if scaling.numel() == 1 else scaling.to(d)[i].reshape(-1)
        else:
            s = scaling
        outs.append(bottleneck_adapter_ref(
            rows[t:t + 1], down_weight[i].to(d), opt(None if down_bias is None else down_bias[i]), up_weight[i].to(d),
            opt(None if up_bias is None else up_bias[i]), activation=activation, scaling=s,
            residual=None if residual_rows is None else residual_rows[t:t + 1], layer_norm=ln))
    return torch.cat(outs).reshape(x.shape) if outs else rows.reshape(x.shape) * 0


def call(op, inputs, index, kwargs, **extra):
    return op(inputs["x"], index, inputs["down_weight"], inputs["down_bias"], inputs["up_weight"], inputs["up_bias"],
              **kwargs, **extra)


def outputs_and_grads(op, inputs, index, kwargs, grad_seed=1, **extra):
    """Output and the gradient of every leaf for a fixed random upstream gradient."""
    for tensor in inputs.values():
        if tensor is not None:
            tensor.grad = None
    out = call(op, inputs, index, kwargs, **extra)
    generator = torch.Generator().manual_seed(grad_seed)
    upstream = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.dtype).to(out.device)
    out.backward(upstream)
    grads = {name: t.grad for name, t in inputs.items() if t is not None}
    return out.detach(), grads


def _rebind(kwargs, inputs):
    """kwargs pointing at the tensors of `inputs` (scaling, residual, LayerNorm)."""
    kwargs = dict(kwargs)
    for key in ("scaling", "residual"):
        if key in inputs:
            kwargs[key] = inputs[key]
    if "layer_norm" in kwargs:
        kwargs["layer_norm"] = (inputs.get("ln_weight"), inputs.get("ln_bias"), kwargs["layer_norm"][2])
    return kwargs


def check_against_naive(case, backend="torch", tolerance=None):
    """The op (backend="torch": the custom op with its explicit backward; "triton": the kernels)
    against the naive per-row loop: the output and every gradient. Adapters without rows must get
    exact zeros."""
    inputs, index, kwargs = make_inputs(case)
    out, grads = outputs_and_grads(multi_adapter, inputs, index, kwargs, backend=backend)
    naive_inputs = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    expected, expected_grads = outputs_and_grads(naive_multi_adapter, naive_inputs, index, _rebind(kwargs, naive_inputs))
    assert out.dtype == case.dtype and out.shape == inputs["x"].shape
    assert_close(out, expected, case.dtype, f"{case} out", tolerance)
    unused = sorted(set(range(case.adapters)) - set(index.reshape(-1).tolist()))
    for name, grad in expected_grads.items():
        if grad is None:  # the naive loop never touched it (no rows at all)
            grad = torch.zeros_like(naive_inputs[name], dtype=torch.float64)
        assert grads[name] is not None, f"{case}: no gradient for {name}"
        assert grads[name].dtype == inputs[name].dtype and grads[name].shape == inputs[name].shape, name
        assert_close(grads[name], grad, case.dtype, f"{case} d{name}", tolerance)
        if unused and name in ("down_weight", "down_bias", "up_weight", "up_bias") or (
                unused and name == "scaling" and case.scaling in ("adapter", "channel")):
            assert torch.count_nonzero(grads[name][unused]) == 0, f"{case}: adapters {unused} without rows got d{name}"


# ------------------------------------------------------------------------------------ torch path


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_torch_path_matches_naive_loop(activation, layer_norm, scaling):
    check_against_naive(MultiCase(5, 3, 33, 5, 3, activation=activation, layer_norm=layer_norm, scaling=scaling))


@pytest.mark.parametrize("case", [
    MultiCase(1, 1, 1, 1, 1),
    MultiCase(4, 3, 16, 4, 1, layer_norm=True),  # N = 1
    MultiCase(6, 5, 24, 3, 4, index="last", scaling="channel"),  # every row one adapter
    MultiCase(7, 4, 40, 6, 7, index="skip", scaling="adapter", layer_norm=True),  # adapters without rows
    MultiCase(123, 0, 70, 16, 5, separate_residual=True, layer_norm=True),  # x [rows, H], one index per row
    MultiCase(3, 7, 33, 7, 4, index="tokens", scaling="channel"),  # x [B, T, H], one index per row
    MultiCase(9, 2, 1023, 16, 3, biases=False, activation="gelu"),
    MultiCase(5, 3, 40, 3, 2, layer_norm=True, ln_affine=False, scaling="shared"),
    MultiCase(4, 2, 64, 1024, 2, activation="silu"),
    MultiCase(0, 3, 16, 4, 3, scaling="channel", layer_norm=True),
    MultiCase(2, 0, 16, 4, 40, scaling="adapter"),  # more adapters than rows
], ids=str)
def test_torch_path_shapes(case):
    check_against_naive(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_path_low_precision(dtype):
    check_against_naive(MultiCase(6, 4, 96, 8, 3, dtype=dtype, layer_norm=True, scaling="channel",
                                  separate_residual=True))


@given(
    batch=st.integers(1, 12), seq=st.integers(0, 5), hidden=st.integers(1, 48), rank=st.integers(1, 12),
    adapters=st.integers(1, 6), activation=st.sampled_from(ACTIVATIONS), layer_norm=st.booleans(),
    scaling=st.sampled_from(SCALINGS), index=st.sampled_from(["random", "skip", "tokens", "last"]),
)
@settings(max_examples=30, deadline=None)
def test_hypothesis_shapes(batch, seq, hidden, rank, adapters, activation, layer_norm, scaling, index):
    # LayerNorm over fewer than 8 features amplifies rounding by its large rstd: not a kernel property
    assume(not layer_norm or hidden >= 8)
    assume(not (index == "tokens" and seq == 0))
    check_against_naive(MultiCase(batch, seq, hidden, rank, adapters, activation=activation, layer_norm=layer_norm,
                                  scaling=scaling, index=index))


@pytest.mark.parametrize("activation", ["gelu", "silu", "tanh", "leaky_relu"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_gradcheck_float64(activation, layer_norm):
    for scaling, separate_residual, index in (("channel", False, "skip"), ("adapter", True, "random"),
                                              ("shared", False, "tokens")):
        case = MultiCase(4, 2, 9, 3, 3, dtype=torch.float64, activation=activation, layer_norm=layer_norm,
                         scaling=scaling, separate_residual=separate_residual, index=index)
        inputs, adapter_index, kwargs = make_inputs(case)
        names = [n for n, t in inputs.items() if t is not None]

        def function(*tensors):
            local = dict(zip(names, tensors))
            # backend="torch": the custom op with its explicit backward formulas
            return call(multi_adapter, local, adapter_index, _rebind(kwargs, local), backend="torch")

        assert torch.autograd.gradcheck(function, tuple(inputs[n] for n in names))


def test_reference_and_fast_path_equal_custom_op():
    # auto on CPU runs the differentiable reference under autograd; backend="torch" goes through the
    # custom op and its explicit backward; multi_adapter_ref is the public reference: all agree
    case = MultiCase(6, 3, 20, 4, 3, layer_norm=True, scaling="channel", activation="gelu", index="skip")
    inputs, index, kwargs = make_inputs(case)
    results = [outputs_and_grads(op, inputs, index, kwargs, **extra)
               for op, extra in ((multi_adapter_ref, {}), (multi_adapter, {}), (multi_adapter, {"backend": "torch"}))]
    (ref_out, ref_grads), others = results[0], results[1:]
    for out, grads in others:
        assert_close(out, ref_out, torch.float32, "out")
        for name in ref_grads:
            assert_close(grads[name], ref_grads[name], torch.float32, name)


def test_unused_adapters_get_exact_zero_gradients():
    x = torch.randn(5, 4, 12)
    index = torch.tensor([0, 3, 3, 0, 0])
    wd = torch.randn(5, 3, 12, requires_grad=True)
    bd = torch.randn(5, 3, requires_grad=True)
    wu = torch.randn(5, 12, 3, requires_grad=True)
    bu = torch.randn(5, 12, requires_grad=True)
    scale = torch.rand(5, requires_grad=True)
    for backend in (None, "torch"):
        for t in (wd, bd, wu, bu, scale):
            t.grad = None
        multi_adapter(x, index, wd, bd, wu, bu, activation="gelu", scaling=scale, backend=backend).square().sum().backward()
        for t in (wd, bd, wu, bu, scale):
            assert torch.count_nonzero(t.grad[[1, 2, 4]]) == 0
            assert torch.count_nonzero(t.grad[[0, 3]]) > 0


def test_non_contiguous_inputs():
    base = torch.randn(40, 6, 2)
    x = base[..., 0].t()  # [6, 40] with stride (1, 12)
    wd = torch.randn(3, 40, 5).transpose(1, 2)  # [3, 5, 40] transposed view
    wu = torch.randn(3, 5, 40).transpose(1, 2)
    index = torch.tensor([2, 0, 1, 2, 2, 0])
    out = multi_adapter(x, index, wd, None, wu, None, activation="gelu", backend="torch")
    expected = naive_multi_adapter(x, index, wd, None, wu, None, activation="gelu")
    assert_close(out, expected, torch.float32, "non-contiguous")


def test_frozen_adapters_give_only_input_grad():
    x = torch.randn(4, 12, requires_grad=True)
    wd, wu = torch.randn(2, 3, 12), torch.randn(2, 12, 3)
    multi_adapter(x, torch.tensor([1, 0, 1, 1]), wd, None, wu, None, backend="torch").sum().backward()
    assert x.grad is not None and wd.grad is None


def test_index_dtypes_and_shapes():
    x = torch.randn(3, 4, 8)
    wd, wu = torch.randn(2, 3, 8), torch.randn(2, 8, 3)
    expected = multi_adapter(x, torch.tensor([1, 0, 1]), wd, None, wu, None)
    assert torch.equal(multi_adapter(x, torch.tensor([1, 0, 1], dtype=torch.int32), wd, None, wu, None), expected)
    per_row = torch.tensor([1, 0, 1])[:, None].expand(3, 4)
    assert torch.equal(multi_adapter(x, per_row, wd, None, wu, None), expected)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_opcheck(layer_norm):
    n, r, h, t = 3, 4, 16, 7
    scaling = torch.randn(n, h, requires_grad=True) if layer_norm else torch.randn(n, requires_grad=True)
    args = (torch.randn(t, h, requires_grad=True), torch.tensor([2, 0, 2, 2, 0, 0, 2]),
            torch.randn(n, r, h, requires_grad=True), torch.randn(n, r, requires_grad=True),
            torch.randn(n, h, r, requires_grad=True), torch.randn(n, h, requires_grad=True),
            scaling, 0.5, None, torch.randn(h, requires_grad=True) if layer_norm else None,
            torch.randn(h, requires_grad=True) if layer_norm else None, 1e-5, layer_norm, 2, 0.01, "")
    torch.library.opcheck(torch.ops.pefops.multi_adapter_fwd.default, args)
    out, z, mean, rstd = (a.detach() for a in torch.ops.pefops.multi_adapter_fwd(*args))
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:11]]
    backward_args = (torch.randn(t, h), *detached, layer_norm, z, mean, rstd, 2, 0.01,
                     [True] * 6 + [False] + [layer_norm] * 2, "")
    torch.library.opcheck(torch.ops.pefops.multi_adapter_bwd.default, backward_args)


class _MultiAdapterBlock(torch.nn.Module):
    def __init__(self, adapters=3, hidden=24, rank=6):
        super().__init__()
        self.down_weight = torch.nn.Parameter(torch.randn(adapters, rank, hidden) * hidden ** -0.5)
        self.down_bias = torch.nn.Parameter(torch.randn(adapters, rank) * 0.1)
        self.up_weight = torch.nn.Parameter(torch.randn(adapters, hidden, rank) * rank ** -0.5)
        self.up_bias = torch.nn.Parameter(torch.randn(adapters, hidden) * 0.1)
        self.scale = torch.nn.Parameter(torch.full((adapters, hidden), 0.5))
        self.norm = torch.nn.LayerNorm(hidden)

    def forward(self, x, index):
        y = multi_adapter(x, index, self.down_weight, self.down_bias, self.up_weight, self.up_bias, activation="silu",
                          scaling=self.scale, layer_norm=(self.norm.weight, self.norm.bias, self.norm.eps))
        return (y * y).sum()


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    eager = _MultiAdapterBlock()
    compiled_module = _MultiAdapterBlock()
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module, fullgraph=True)
    x = torch.randn(4, 7, 24)
    index = torch.tensor([2, 0, 2, 2])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss_eager, loss_compiled = eager(x1, index), compiled(x2, index)
    loss_eager.backward()
    loss_compiled.backward()
    assert_close(loss_compiled, loss_eager, torch.float32, "loss")
    assert_close(x2.grad, x1.grad, torch.float32, "dx")
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled_module.parameters()):
        assert_close(p_compiled.grad, p_eager.grad, torch.float32, name)


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("change, message", [
    (dict(adapter_index=torch.tensor([0, 3, 1])), "adapter_index values must lie in \\[0, 3\\).*from 0 to 3"),
    (dict(adapter_index=torch.tensor([0, -1, 1])), "adapter_index values must lie in \\[0, 3\\)"),
    (dict(adapter_index=torch.tensor([0, 1])), "adapter_index must have shape \\(3,\\)"),
    (dict(adapter_index=torch.tensor([0.0, 1.0, 2.0])), "adapter_index must be an integer tensor"),
    (dict(adapter_index=[0, 1, 2]), "adapter_index must be an integer tensor"),
    (dict(x=torch.randn(16)), "x must be a tensor \\[batch, ..., hidden\\]"),
    (dict(x=torch.randn(3, 16).to(torch.int64)), "x must be float32"),
    (dict(down_weight=torch.randn(4, 16)), "down_weight must be \\[adapters, rank, hidden=16\\]"),
    (dict(down_weight=torch.randn(3, 4, 15)), "down_weight must be \\[adapters, rank, hidden=16\\]"),
    (dict(up_weight=torch.randn(3, 4, 16)), "up_weight must have shape \\(3, 16, 4\\)"),
    (dict(up_weight=torch.randn(2, 16, 4)), "up_weight must have shape \\(3, 16, 4\\)"),
    (dict(down_bias=torch.randn(4)), "down_bias must have shape \\(3, 4\\)"),
    (dict(up_bias=torch.randn(3, 16, dtype=torch.float64)), "up_bias must have x's dtype"),
    (dict(residual=torch.randn(3, 15)), "residual must have shape \\(3, 16\\)"),
    (dict(scaling=torch.randn(7)), "scaling must be a float, a one-element tensor, a tensor \\[adapters=3\\]"),
    (dict(scaling=torch.randn(16)), "scaling must be a float, a one-element tensor"),
    (dict(scaling=torch.tensor([1, 2, 3])), "scaling tensor must be floating point"),
    (dict(scaling="big"), "scaling must be a float or a tensor"),
    (dict(activation="gelu2"), "unknown activation 'gelu2'"),
    (dict(layer_norm=(torch.ones(16), torch.zeros(16))), "layer_norm must be a tuple"),
    (dict(layer_norm=(torch.ones(15), torch.zeros(16), 1e-5)), "layer_norm weight must have shape"),
    (dict(layer_norm=(None, None, -1.0)), "eps must be a positive float"),
    (dict(backend="cudnn"), "backend='cudnn' is not a backend"),
])
@pytest.mark.parametrize("backend", [None, "torch"])
def test_bad_arguments_raise_value_error(change, message, backend):
    arguments = dict(x=torch.randn(3, 16), adapter_index=torch.tensor([0, 2, 1]), down_weight=torch.randn(3, 4, 16),
                     down_bias=torch.randn(3, 4), up_weight=torch.randn(3, 16, 4), up_bias=torch.randn(3, 16))
    keyword = {} if backend is None else {"backend": backend}
    for key, value in change.items():
        (arguments if key in arguments else keyword)[key] = value
    with pytest.raises(ValueError, match=message):
        multi_adapter(**{k: arguments.pop(k) for k in ("x", "adapter_index")}, down_weight=arguments.pop("down_weight"),
                      down_bias=arguments.pop("down_bias"), up_weight=arguments.pop("up_weight"),
                      up_bias=arguments.pop("up_bias"), **keyword)


def test_torch_backend_checks_the_index_range_itself():
    # the check the torch backend makes (it synchronises for its sizes anyway), below the public op
    x, wd, wu = torch.randn(3, 8), torch.randn(2, 3, 8), torch.randn(2, 8, 3)
    with pytest.raises(ValueError, match="adapter_index values must lie in \\[0, 2\\)"):
        torch.ops.pefops.multi_adapter_fwd(x, torch.tensor([0, 2, 1]), wd, None, wu, None, None, 1.0, None, None,
                                           None, 1e-5, False, 1, 0.01, "torch")


def test_backend_limits():
    problem = lambda tokens, rank: backends.Problem(torch.device("cuda"), torch.float16, "forward",  # noqa: E731
                                                    {"tokens": tokens, "hidden": 64, "rank": rank, "adapters": 4})
    assert "at most 16 rows" in " ".join(backends.implementations("multi_adapter")["cuda"].limits(problem(17, 8)))
    assert "rank 2048 exceeds" in " ".join(adapter_call.triton_limits(problem(4, 2048)))
    assert adapter_call.triton_limits(problem(4, 1024)) == []
    cuda = backends.implementations("multi_adapter")["cuda"]
    assert not cuda.has_backward
    # on CPU, automatic selection is the torch reference
    cpu = backends.Problem(torch.device("cpu"), torch.float32, "backward", {"tokens": 4, "hidden": 8, "rank": 2, "adapters": 2})
    assert backends.select("multi_adapter", cpu).backend == "torch"
