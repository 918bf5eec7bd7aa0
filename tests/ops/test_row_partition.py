"""split_rows / merge_rows: a partition of a batch's rows, values and gradients against x[rows] and
torch.cat(...)[order] (what the mixed-task sites used before)."""

import pytest
import torch

from pefops.ops.row_partition import merge_rows, split_rows


def _partition(batch, sizes, seed=0):
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
    return list(torch.split(order, sizes))


def _reference(x, row_sets, functions):
    pieces = [function(x[rows]) for function, rows in zip(functions, row_sets)]
    order = torch.argsort(torch.cat(row_sets))
    return torch.cat(pieces)[order]


@pytest.mark.parametrize("shape, sizes", [((6,), [2, 4]), ((7, 3, 5), [3, 0, 4]), ((5, 2), [5]),
                                          ((8, 4, 3), [1, 2, 2, 3])])
def test_values_and_gradients_match_gather_and_cat(shape, sizes):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    row_sets = _partition(shape[0], sizes)
    scales = [torch.randn(shape[1:], dtype=torch.float64) for _ in sizes]
    functions = [lambda t, s=s: (t * s).sin() for s in scales]
    ours = merge_rows([f(p) for f, p in zip(functions, split_rows(x, row_sets))], row_sets, shape[0])
    expected = _reference(x, row_sets, functions)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    read_out = torch.randn(shape, dtype=torch.float64)
    grad_ours, = torch.autograd.grad((ours * read_out).sum(), x)
    grad_expected, = torch.autograd.grad((expected * read_out).sum(), x)
    torch.testing.assert_close(grad_ours, grad_expected, rtol=0, atol=0)


def test_gradcheck():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    row_sets = _partition(5, [2, 3])
    weight = torch.randn(3, 3, dtype=torch.float64)

    def function(x):
        first, second = split_rows(x, row_sets)
        return merge_rows([first @ weight, second.exp()], row_sets, 5)

    assert torch.autograd.gradcheck(function, (x,))


def test_a_piece_that_does_not_reach_the_loss_gets_zero_gradient_rows():
    x = torch.randn(6, 4, requires_grad=True)
    row_sets = _partition(6, [3, 3])
    used, unused = split_rows(x, row_sets)
    used.square().sum().backward()
    expected = torch.zeros_like(x)
    expected[row_sets[0]] = 2 * x.detach()[row_sets[0]]
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)


def test_merged_rows_reach_only_their_own_piece():
    pieces = [torch.randn(2, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)]
    row_sets = _partition(6, [2, 4])
    merged = merge_rows(pieces, row_sets, 6)
    read_out = torch.randn(6, 3)
    (merged * read_out).sum().backward()
    for piece, rows in zip(pieces, row_sets):
        torch.testing.assert_close(piece.grad, read_out[rows], rtol=0, atol=0)


def test_merge_refuses_pieces_of_different_dtypes_or_widths():
    row_sets = _partition(4, [2, 2])
    with pytest.raises(ValueError, match="dtype and trailing shape"):
        merge_rows([torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)], row_sets, 4)
    with pytest.raises(ValueError, match="dtype and trailing shape"):
        merge_rows([torch.zeros(2, 3), torch.zeros(2, 4)], row_sets, 4)
