"""The bucket-id and round-combine steps of LSH attention (pefops.ops.lsh_rounds): the torch backend
against transformers' formulas, the Triton backend (forced; interpreted on CPU) against the torch one,
the combine's custom ops (opcheck, gradients, fp32 rounding at mask-constant lse)."""

import pytest
import torch

from pefops.ops import lsh_rounds
from tests.tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def transformers_bucket_ids(rotated, factors, keep):
    """transformers' _hash_vectors after the einsum, written as there (cat + argmax, torch.where)."""
    buckets, cur_sum, cur_product = None, 0, 1
    for factor in factors:
        part = rotated[..., cur_sum:cur_sum + factor // 2]
        cur_sum += factor // 2
        arg = torch.argmax(torch.cat([part, -part], dim=-1), dim=-1)
        buckets = arg if buckets is None else buckets + cur_product * arg
        cur_product *= factor
    num_buckets = cur_product
    if keep is not None and not bool(keep.all()):
        num_buckets += 1
        buckets = torch.where(keep[:, None, None, :], buckets, torch.tensor(num_buckets - 1))
    offsets = (torch.arange(rotated.shape[2]) * num_buckets).view(1, 1, -1, 1)
    return (buckets + offsets).flatten(2, 3)


@pytest.mark.parametrize("factors", [[8], [4, 6], [2, 2, 2]])
@pytest.mark.parametrize("padding", [None, "none padded", "padded"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_bucket_ids_equal_transformers(factors, padding, backend):
    generator = torch.Generator().manual_seed(3)
    rotated = torch.randn(2, 3, 2, 37, sum(factors) // 2, generator=generator)
    rotated[0, 0, 0, :5] = 0.0  # ties everywhere: first index wins, as argmax
    keep = None
    if padding is not None:
        keep = torch.ones(2, 37, dtype=torch.bool)
        if padding == "padded":
            keep[1, 30:] = False
    expected = transformers_bucket_ids(rotated, factors, keep)
    actual = lsh_rounds.bucket_ids(rotated.to(DEVICE), factors, None if keep is None else keep.to(DEVICE),
                                   backend=backend)
    assert actual.dtype == torch.int64
    assert torch.equal(actual.cpu(), expected)


def transformers_combine(out_rounds, lse_rounds):
    weights = torch.exp(lse_rounds - torch.logsumexp(lse_rounds, dim=2, keepdim=True)).unsqueeze(-1)
    return torch.sum(out_rounds * weights, dim=2)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_combine_equals_transformers_with_gradients(backend, dtype):
    generator = torch.Generator().manual_seed(5)
    out_rounds = torch.randn(2, 2, 3, 19, 16, generator=generator)
    lse_rounds = torch.randn(2, 2, 3, 19, generator=generator) * 4
    lse_rounds[0, 0, :, 0] = -1e5  # every round only the self-masked key: the fp32 rounding shows
    grad = torch.randn(2, 2, 19, 16, generator=generator)
    reference_leaves = [out_rounds.clone().requires_grad_(), lse_rounds.clone().requires_grad_()]
    expected = transformers_combine(*reference_leaves)
    (expected * grad).sum().backward()
    leaves = [out_rounds.to(DEVICE, dtype).requires_grad_(), lse_rounds.to(DEVICE).requires_grad_()]
    actual = lsh_rounds.combine_rounds(*leaves, backend=backend)
    (actual * grad.to(DEVICE, dtype)).sum().backward()
    tolerance_dtype = dtype
    assert_close(actual.float().cpu(), expected, tolerance_dtype, "out")
    assert_close(leaves[0].grad.float().cpu(), reference_leaves[0].grad, tolerance_dtype, "grad out_rounds")
    assert_close(leaves[1].grad.cpu(), reference_leaves[1].grad, tolerance_dtype, "grad lse_rounds")


def test_combine_custom_ops_pass_opcheck():
    out_rounds = torch.randn(1, 2, 2, 8, 4)
    lse_rounds = torch.randn(1, 2, 2, 8)
    torch.library.opcheck(lsh_rounds._lsh_combine_fwd, (out_rounds.requires_grad_(), lse_rounds.requires_grad_(),
                                                        "torch"))
    out, _ = lsh_rounds._lsh_combine_fwd(out_rounds, lse_rounds, "torch")
    torch.library.opcheck(lsh_rounds._lsh_combine_bwd, (torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8),
                                                        out_rounds.detach(), lse_rounds.detach(), out.detach(),
                                                        "torch"))


def test_combine_custom_op_equals_the_eager_expression_in_float64():
    generator = torch.Generator().manual_seed(7)
    out_rounds = torch.randn(1, 1, 3, 5, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    lse_rounds = torch.randn(1, 1, 3, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    torch.autograd.gradcheck(lambda o, l: lsh_rounds._lsh_combine_fwd(o, l, "torch")[0], (out_rounds, lse_rounds))
