"""prefix_attention with a mask that covers the prefix columns (issue 15: rows of a mixed-task batch
with different or no prefixes): each row equals the op run on that row alone with only its own
prefix slots, outputs and gradients, bool and additive masks, causal and not. The Triton kernels
against this backend: tests/kernels/test_prefix_attention_prefix_mask.py."""

import pytest
import torch

from pefops.ops.prefix_attention import prefix_attention, prefix_attention_ref


def _row_alone(q, k, v, pk, pv, key_keep, causal, row, length):
    """Row `row` with its first `length` prefix slots only (None: no prefix)."""
    prefix = (pk[row, :, :length], pv[row, :, :length]) if length else (None, None)
    return prefix_attention_ref(q[row:row + 1], k[row:row + 1], v[row:row + 1], *prefix,
                                attention_mask=key_keep[row:row + 1], causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("additive", [False, True])
def test_rows_equal_their_own_prefix_alone(causal, additive):
    torch.manual_seed(0)
    batch, q_heads, kv_heads, seq, prefix_len, dim = 4, 4, 2, 7, 5, 8
    q = torch.randn(batch, q_heads, seq, dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq, dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq, dim, dtype=torch.float64, requires_grad=True)
    pk = torch.randn(batch, kv_heads, prefix_len, dim, dtype=torch.float64, requires_grad=True)
    pv = torch.randn(batch, kv_heads, prefix_len, dim, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 0, 3, 5])
    key_keep = torch.ones(batch, seq, dtype=torch.bool)
    key_keep[2, :2] = False  # left padding on one row
    slot_keep = torch.arange(prefix_len)[None, :] < lengths[:, None]
    keep = torch.cat([slot_keep, key_keep], dim=1)[:, None, None, :]  # [B, 1, 1, P + S]
    mask = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf")) if additive else keep
    out = prefix_attention(q, k, v, pk, pv, attention_mask=mask, causal=causal)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, pk, pv), grad)
    for row, length in enumerate(lengths.tolist()):
        alone = _row_alone(q, k, v, pk, pv, key_keep, causal, row, length)
        torch.testing.assert_close(out[row:row + 1], alone, rtol=1e-10, atol=1e-10)
        inputs = (q, k, v) + ((pk, pv) if length else ())
        alone_grads = torch.autograd.grad(alone, inputs, grad[row:row + 1])
        for got, expected in zip(grads[:3], alone_grads[:3]):
            torch.testing.assert_close(got[row:row + 1], expected[row:row + 1], rtol=1e-9, atol=1e-10)
        for got, expected in zip(grads[3:], alone_grads[3:]):
            torch.testing.assert_close(got[row:row + 1, :, :length], expected[row:row + 1, :, :length], rtol=1e-9, atol=1e-10)
        # the slots that are not the row's own get no gradient
        assert grads[3][row, :, length:].abs().sum() == 0 and grads[4][row, :, length:].abs().sum() == 0


def test_a_mask_of_another_width_is_refused():
    q = torch.randn(1, 2, 3, 8)
    pk = torch.randn(1, 2, 2, 8)
    with pytest.raises(ValueError, match=r"keys size 4 must be 1 or 3 or every prefix slot and key \(last size 5\)"):
        prefix_attention(q, q, q, pk, pk, attention_mask=torch.ones(1, 1, 1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"must cover every sequence key \(last size 3\) or every prefix slot"):
        prefix_attention(q, q, q, pk, pk, attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool))
