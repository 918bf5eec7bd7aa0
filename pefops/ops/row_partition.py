"""Splitting a mixed-task batch into its tasks' rows and putting the results back, with gradients.

A mixed-task site runs each group of rows through its own computation, then writes every group's
result into one batch. Built from x[rows] and torch.cat(...)[order], autograd's backward of each
gather zero-fills a batch-sized buffer and scatters into it, and the pieces' gradients are added:
per site three full zero fills and an add that carry no information, because the groups partition
the batch (every row in exactly one group). These two functions use that: the forward writes each
output row once, and each backward writes each gradient row once (index_copy_ into an empty buffer,
index_select out of it). Measured on BERT-base width (notes: bench/NOTES.md, issue #15).

Internal: callers pass row index sets that partition 0 .. batch - 1 (each row in exactly one set).
A set that misses a row would leave that row of the result uninitialised, so only code that builds
the sets from one routing index calls these.
"""

from __future__ import annotations

from typing import Sequence

import torch


class _SplitRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, *row_sets: torch.Tensor):
        # x: [batch, ...]; each row set: int64 [rows_i]; returns one [rows_i, ...] piece per set
        ctx.save_for_backward(*row_sets)
        ctx.batch_shape = x.shape
        ctx.set_materialize_grads(False)
        return tuple(x.index_select(0, rows) for rows in row_sets)

    @staticmethod
    def backward(ctx, *grads):
        row_sets = ctx.saved_tensors
        reference = next((g for g in grads if g is not None), None)
        if reference is None:
            return (None,) + (None,) * len(row_sets)
        grad_x = reference.new_empty(ctx.batch_shape)
        for rows, grad in zip(row_sets, grads):
            if grad is None:  # that piece did not reach the loss: its rows' gradient is zero
                grad_x.index_fill_(0, rows, 0)
            else:
                grad_x.index_copy_(0, rows, grad.to(grad_x.dtype))
        return (grad_x,) + (None,) * len(row_sets)


class _MergeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, batch: int, row_sets: tuple, *pieces: torch.Tensor):
        # pieces: [rows_i, ...] each, one per row set; returns [batch, ...]
        ctx.row_sets = row_sets
        ctx.set_materialize_grads(False)
        out = pieces[0].new_empty((batch, *pieces[0].shape[1:]))
        for rows, piece in zip(row_sets, pieces):
            out.index_copy_(0, rows, piece)
        return out

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return (None, None) + (None,) * len(ctx.row_sets)
        return (None, None) + tuple(grad.index_select(0, rows) for rows in ctx.row_sets)


def split_rows(x: torch.Tensor, row_sets: Sequence[torch.Tensor]) -> tuple:
    """x [batch, ...] as one tensor of its rows per set (row_sets partition 0 .. batch - 1)."""
    return _SplitRows.apply(x, *row_sets)


def merge_rows(pieces: Sequence[torch.Tensor], row_sets: Sequence[torch.Tensor], batch: int) -> torch.Tensor:
    """The [batch, ...] tensor whose rows row_sets[i] are pieces[i] (row_sets partition 0 .. batch - 1;
    every piece of one dtype and trailing shape)."""
    dtypes = {piece.dtype for piece in pieces}
    if len(dtypes) != 1 or len({piece.shape[1:] for piece in pieces}) != 1:
        raise ValueError(f"merge_rows: pieces must share dtype and trailing shape; got "
                         f"{[(piece.dtype, tuple(piece.shape)) for piece in pieces]}")
    return _MergeRows.apply(batch, tuple(row_sets), *pieces)
