"""The torch backend of LSH attention's chunked core (pefops.ops.lsh_attention), vectorised.

Inputs as the spec's core: q, k [B, H, S, D] (k already normalised / scaled), v [B, H, S, Dv],
q_idx / k_idx [B, H, nh * S] (original position of every sorted query / key), key_mask [B, S]
bool or None. Sorted queries in chunks of L attend to their chunk and its neighbours (wrapping
around over all nh * S / L chunks); outputs and lse go back to (round, original position).
A window longer than the sequence (before or after > the number of chunks) is transformers' own:
its _look_adjacent repeats the query's chunk for steps >= the number of chunks away, which the
cyclic layout below cannot express; _general_core (explicit windows, small there) serves it.

CPU cost is dominated by passes over, and fresh allocations of, the [B, H, chunks, L, W*L] scores
(a fresh large tensor costs page faults), and on a busy machine by the number of parallel ops.
So: one gather each of the sorted queries, keys and values (the windows are overlapping strided
views, see _Layout), batched matmuls over all chunks of all rounds, masks from broadcast
positions with the self mask written sparsely, an in-place softmax whose exp never takes the
slow underflow path, a backward without any mask, gathers through inverse permutations instead
of index_add_ (slow on several threads), the shape-only index arithmetic cached.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from pefops.ops.common import compute_dtype, once_differentiable


class _Layout(NamedTuple):
    """Index plan of one call in "padded chunk space".

    Per (b, h) the sorted sequence of C = N / L chunks is laid out as P = C + W - 1 chunks (W =
    before + 1 + after): padded key chunk p holds sorted chunk (p - before) mod C, so the window of
    query chunk j (< C) is the W consecutive padded chunks j .. j + W - 1, and all windows are one
    overlapping strided view of the key buffer (batch stride L rows), never W copies. Folding (b, h)
    into that batch dimension gives P - C = W - 1 "spare" query chunks per (b, h) whose windows run
    into the next (b, h); their rows are computed (a (W - 1) / C overhead) and never used: their
    output is not read back and their output gradient is zero."""

    q_rows: torch.Tensor  # [B*H*P*L] row of q.view(-1, D) read by each padded query row
    k_rows: torch.Tensor  # [(B*H*P + W - 1) * L] row of k.view(-1, D) of each key-buffer row
    k_pos: torch.Tensor  # [(B*H*P + W - 1) * L] original position of each key-buffer row
    k_owner: torch.Tensor  # [(B*H*P + W - 1) * L] batch * S of each key-buffer row
    q_pos: torch.Tensor  # [B*H*P, L, 1] original position of each padded query row (-1: spare)
    q_source: torch.Tensor  # [B*H*P*L] flat (b, h, round, position) row of each padded query row
    real: torch.Tensor  # [P*L, 1] bool, the padded query row is a real sorted query
    q_inverse: torch.Tensor  # [B*H*nh*S] padded query row of (b, h, round, position)
    k_inverse: torch.Tensor  # [B*H*nh*S] sorted row (b, h) * N + slot of the key (b, h, round, position)
    static: "_Static"
    shape: tuple  # (B, H, S, C, L, W, P)


class _Static(NamedTuple):
    """The index arithmetic of a layout that depends on the shapes only (cached: on a busy CPU
    every small parallel op costs a thread-synchronisation, so the per-call ops are kept few)."""

    q_slot: torch.Tensor  # [P*L] sorted slot read by each padded query row
    q_source_base: torch.Tensor  # [G, P*L] round and group offsets of the rows' (b, h, round, position)
    real: torch.Tensor  # [P*L, 1] bool
    group_seq: torch.Tensor  # [G, 1] group * S
    k_take: torch.Tensor  # [(G*P + W - 1) * L] flat index into k_idx of each key-buffer row
    k_rows_base: torch.Tensor  # [(G*P + W - 1) * L] group * S of each key-buffer row
    k_owner: torch.Tensor  # [(G*P + W - 1) * L] batch * S of each key-buffer row (key mask rows)
    dest_base: torch.Tensor  # [G, N] round and group offsets of (b, h, round, position) rows
    q_inverse_values: torch.Tensor  # [G*N] padded query row of each sorted slot
    k_inverse_values: torch.Tensor  # [G*N] flat sorted row of each sorted slot
    query_chunk: torch.Tensor  # [G, 1, N] global chunk number of each sorted query
    self_base: torch.Tensor  # [G, 1, N] flat score row of each sorted query times W*L


@functools.lru_cache(maxsize=64)
def _static(batch, heads, seq, total, length, before, after, device) -> _Static:
    width = before + 1 + after
    chunks = total // length
    padded = chunks + width - 1
    groups = batch * heads
    group = torch.arange(groups, device=device).view(groups, 1)
    in_chunk = torch.arange(length, device=device)
    slots = torch.arange(total, device=device)
    round_base = slots // seq * seq
    # queries: padded chunk j < C is sorted chunk j; spare chunks re-read chunks 0.. (any rows do)
    q_slot = ((torch.arange(padded, device=device) % chunks).view(-1, 1) * length + in_chunk).view(-1)
    # keys: buffer chunk g = (b, h) * P + p holds sorted chunk (p - before) mod C of group g // P;
    # W - 1 trailing chunks (re-reads) keep the last spare windows inside the buffer
    buffer_chunk = torch.arange(groups * padded + width - 1, device=device)
    k_group = (buffer_chunk // padded).clamp_(max=groups - 1).view(-1, 1)
    k_slot = torch.remainder(buffer_chunk % padded - before, chunks).view(-1, 1) * length + in_chunk
    k_group_rows = k_group.expand(-1, length).reshape(-1)
    return _Static(
        q_slot=q_slot, q_source_base=round_base[q_slot] + group * total,
        real=(torch.arange(padded * length, device=device) < total).view(-1, 1), group_seq=group * seq,
        k_take=(k_group * total + k_slot).view(-1), k_rows_base=k_group_rows * seq,
        k_owner=k_group_rows // heads * seq, dest_base=round_base + group * total,
        q_inverse_values=(slots + group * (padded * length)).view(-1),
        k_inverse_values=(slots + group * total).view(-1),
        query_chunk=((slots + group * total) // length).view(groups, 1, total),
        self_base=((group * (padded * length) + slots) * (width * length)).view(groups, 1, total),
    )


def _layout(q_idx, k_idx, seq, chunk_length, before, after) -> _Layout:
    batch, heads, total = q_idx.shape
    length, width = chunk_length, before + 1 + after
    chunks = total // length
    groups = batch * heads
    static = _static(batch, heads, seq, total, length, before, after, q_idx.device)
    q_flat, k_flat = q_idx.reshape(groups, total), k_idx.reshape(groups, total)
    q_pos = q_flat.index_select(1, static.q_slot)  # [G, P*L]
    k_pos = k_flat.reshape(-1).take(static.k_take)
    # inverse permutations: gathers, never index_add_ (slow on several CPU threads)
    q_dest = (q_flat + static.dest_base).view(-1)
    q_inverse = torch.empty_like(q_dest).scatter_(0, q_dest, static.q_inverse_values)
    k_dest = q_dest if k_idx is q_idx else (k_flat + static.dest_base).view(-1)
    k_inverse = torch.empty_like(k_dest).scatter_(0, k_dest, static.k_inverse_values)
    return _Layout(
        q_rows=(q_pos + static.group_seq).view(-1), k_rows=k_pos + static.k_rows_base, k_pos=k_pos,
        k_owner=static.k_owner, q_pos=torch.where(static.real.view(-1), q_pos, -1).view(-1, length, 1),
        q_source=(q_pos + static.q_source_base).view(-1), real=static.real, q_inverse=q_inverse,
        k_inverse=k_inverse, static=static, shape=(batch, heads, seq, chunks, length, width, chunks + width - 1),
    )


def _windows(buffer_rows, layout: _Layout):
    """[(G*P + W - 1) * L, X] key-buffer rows -> overlapping windows [G*P, W*L, X] (a view)."""
    length, width, padded = layout.shape[4:]
    groups = layout.shape[0] * layout.shape[1]
    x = buffer_rows.shape[-1]
    return buffer_rows.as_strided((groups * padded, width * length, x), (length * x, x, 1))


def _dropped(layout: _Layout, key_mask, causal: bool):
    """Where a score becomes mask_value: [G*P, L, W*L] (causal) or [G*P, 1, W*L] (padding only)
    bool, or None; one comparison of positions broadcast, never an expanded integer tensor."""
    batch, heads, seq = layout.shape[:3]
    key_pos = layout.k_pos
    keep = None
    if key_mask is not None:
        keep = key_mask.reshape(-1).take(layout.k_owner + key_pos)
    if causal:
        if keep is not None:
            # a padded key acts as one from the future: position seq exceeds every query's
            key_pos = torch.where(keep, key_pos, seq)
        return layout.q_pos < _windows(key_pos.view(-1, 1), layout).transpose(1, 2)
    return None if keep is None else ~_windows(keep.view(-1, 1), layout).transpose(1, 2)


def _self_entries(q_idx, layout: _Layout, before: int) -> torch.Tensor:
    """Flat indices into the scores [G*P*L, W*L] of every entry whose key is the query's own
    position, in every round's copy and every repetition of a chunk in the window. Found from the
    sorted slot of each position's key in each round ([G, rounds, N], small), not by comparing
    all W*L scores of every query."""
    batch, heads, seq, chunks, length, width, padded = layout.shape
    groups, total = batch * heads, q_idx.shape[-1]
    rounds = total // seq
    # copies[g, r, t]: flat sorted row (g * N + slot) of the key of query t's position in round r
    copies = layout.k_inverse.view(groups, rounds, seq).gather(
        -1, q_idx.reshape(groups, 1, total).expand(-1, rounds, -1))
    # window slot w of query chunk c holds chunk (c + w - before) mod C: a copy in chunk c' sits at
    # w = (c' - c + before) mod C (+ C, 2C, ... when the window is wider than the C chunks); global
    # chunk numbers differ by the same amount (N is a multiple of L)
    rel = torch.remainder(copies // length - layout.static.query_chunk + before, chunks)
    base = layout.static.self_base + copies % length
    entries = []
    for repeat in range((width + chunks - 1) // chunks):  # one pass unless the window repeats chunks
        window_slot = rel + repeat * chunks
        entries.append((base + window_slot * length)[window_slot < width])
    return torch.cat(entries) if len(entries) > 1 else entries[0]


def _gather_rows(tensor, rows, dtype):
    """tensor.view(-1, X)[rows] in dtype (embedding: CPU's row gather)."""
    table = tensor.reshape(-1, tensor.shape[-1])
    return torch.nn.functional.embedding(rows, table).to(dtype)


def _gathered(q, k, v, layout, cdt):
    """(padded queries [G*P, L, D], key buffer, value buffer [(G*P + W - 1) * L, D|Dv])."""
    length = layout.shape[4]
    q_padded = _gather_rows(q, layout.q_rows, cdt).view(-1, length, q.shape[-1])
    return q_padded, _gather_rows(k, layout.k_rows, cdt), _gather_rows(v, layout.k_rows, cdt)


def _probabilities(q_padded, k_buffer, q_idx, layout, key_mask, causal, self_mask, scale, mask_value,
                   self_mask_value, before):
    """Softmax probabilities [G*P, L, W*L] and lse [G*P, L, 1] in the compute dtype."""
    scores = torch.bmm(q_padded, _windows(k_buffer, layout).transpose(1, 2))
    if scale != 1.0:
        scores.mul_(scale)
    dropped = _dropped(layout, key_mask, causal)
    if dropped is not None:
        scores.masked_fill_(dropped, mask_value)
    if self_mask:  # last, as transformers: also over masked keys
        scores.view(-1).index_fill_(0, _self_entries(q_idx, layout, before), self_mask_value)
    row_max = scores.amax(-1, keepdim=True)
    # exp of arguments below -87 (underflow: every mask constant) takes a slow path on CPU, 30x the
    # normal cost, and denormal probabilities would slow every later product: arguments clamped at
    # -80, then everything below 1e-30 (exp(-69)) set to exactly 0 as the masked entries are in
    # transformers; a difference of < 1e-30 relative, in the probabilities and the gradients
    probs = torch.nn.functional.threshold_(scores.sub_(row_max).clamp_min_(-80.0).exp_(), 1e-30, 0.0)
    lse = row_max + probs.sum(-1, keepdim=True).log_()
    # probs = exp(s - lse) as transformers computes it: lse rounded in the compute dtype, so that a
    # row of mask constants (lse == -1e5 + log 2 rounded in fp32) gets transformers' weights
    probs.mul_(torch.exp(row_max.sub_(lse)))
    return probs, lse


def _dropout(probs, dropout_p, layout):
    """Dropout of the real rows' probabilities, drawn over a [B, H, C, L, W*L]-ordered tensor as
    transformers draws it (same generator state, same mask); spare rows 0."""
    batch, heads, seq, chunks, length, width, padded = layout.shape
    attend = torch.zeros_like(probs)
    real_rows = probs.view(batch * heads, padded, -1)[:, :chunks]
    attend.view(batch * heads, padded, -1)[:, :chunks] = torch.nn.functional.dropout(real_rows, p=dropout_p)
    return attend


def _place(padded_rows, layout, rounds, out_dtype):
    """Padded per-query rows [G*P, L, X] -> [B, H, nh, S, X] at (round, original position)."""
    batch, heads, seq = layout.shape[:3]
    width = padded_rows.shape[-1]
    flat = torch.nn.functional.embedding(layout.q_inverse, padded_rows.reshape(-1, width))
    return flat.view(batch, heads, rounds, seq, width).to(out_dtype)


def chunked_forward_torch(q, k, v, q_idx, k_idx, key_mask, *, chunk_length, chunks_before, chunks_after, causal,
                           self_mask, scale, mask_value, self_mask_value):
    """The core (spec): -> out_rounds [B,H,nh,S,Dv] (v's dtype), lse_rounds [B,H,nh,S] float32."""
    if _irregular(q, q_idx, chunk_length, chunks_before, chunks_after):
        with torch.no_grad():
            return _general_core(q, k, v, q_idx, k_idx, key_mask, chunk_length, chunks_before, chunks_after, causal,
                                 self_mask, scale, mask_value, self_mask_value)
    out_rounds, lse_rounds, _ = _forward_impl(q, k, v, q_idx, k_idx, key_mask, chunk_length, chunks_before,
                                              chunks_after, causal, self_mask, scale, mask_value, self_mask_value)
    return out_rounds, lse_rounds


@torch.no_grad()
def _forward_impl(q, k, v, q_idx, k_idx, key_mask, chunk_length, chunks_before, chunks_after, causal, self_mask,
                  scale, mask_value, self_mask_value, dropout_p=0.0):
    """Forward returning also what the eager backward keeps (no gather or softmax again):
    (layout, padded queries, key buffer, value buffer, probs, dropped-out probs or None, lse).
    Autocast is off inside: the op picks its own compute dtype (float32 for 16-bit inputs), and the
    backward, which runs outside autocast, finds the saved tensors in that dtype."""
    with torch.autocast(q.device.type, enabled=False):
        return _forward_in_compute_dtype(q, k, v, q_idx, k_idx, key_mask, chunk_length, chunks_before, chunks_after,
                                         causal, self_mask, scale, mask_value, self_mask_value, dropout_p)


def _forward_in_compute_dtype(q, k, v, q_idx, k_idx, key_mask, chunk_length, chunks_before, chunks_after, causal,
                              self_mask, scale, mask_value, self_mask_value, dropout_p):
    seq = q.shape[2]
    layout = _layout(q_idx, k_idx, seq, chunk_length, chunks_before, chunks_after)
    cdt = compute_dtype(q.dtype)
    q_padded, k_buffer, v_buffer = _gathered(q, k, v, layout, cdt)
    probs, lse = _probabilities(q_padded, k_buffer, q_idx, layout, key_mask, causal, self_mask, scale, mask_value,
                                self_mask_value, chunks_before)
    attend = probs if dropout_p == 0.0 else _dropout(probs, dropout_p, layout)
    out_padded = torch.bmm(attend, _windows(v_buffer, layout))
    rounds = q_idx.shape[-1] // seq
    out_rounds = _place(out_padded, layout, rounds, v.dtype)
    lse_rounds = _place(lse, layout, rounds, cdt).squeeze(-1)
    saved = (layout, q_padded, k_buffer, v_buffer, probs, attend if dropout_p > 0.0 else None, lse)
    return out_rounds, lse_rounds, saved


def chunked_backward_torch(grad_out_rounds, grad_lse_rounds, q, k, v, q_idx, k_idx, key_mask, out_rounds, lse_rounds,
                            *, chunk_length, chunks_before, chunks_after, causal, self_mask, scale, mask_value,
                            self_mask_value):
    """The core's backward (spec), recomputing the probabilities: -> (dq, dk, dv) float32."""
    if _irregular(q, q_idx, chunk_length, chunks_before, chunks_after):
        config = (chunk_length, chunks_before, chunks_after, causal, self_mask, scale, mask_value, self_mask_value)
        outputs, vjp = _general_recorded(q, k, v, q_idx, k_idx, key_mask, config)
        return _general_grads(outputs, vjp, grad_out_rounds, grad_lse_rounds, q)
    return _backward_impl(grad_out_rounds, grad_lse_rounds, q, k, v, q_idx, k_idx, key_mask, out_rounds,
                          chunk_length, chunks_before, chunks_after, causal, self_mask, scale, mask_value,
                          self_mask_value, saved=None)


@torch.no_grad()
def _backward_impl(grad_out_rounds, grad_lse_rounds, q, k, v, q_idx, k_idx, key_mask, out_rounds, chunk_length,
                   chunks_before, chunks_after, causal, self_mask, scale, mask_value, self_mask_value, saved):
    """ds = p * (dp - (rowsum(dO * O) - dlse)); gradients of the key / value buffers come window
    slab by window slab (W shifted products), then fold the wrap-around copies and go back to the
    original rows through the inverse permutations.

    Scores replaced by a constant have no gradient. No mask is needed for that: in a row with a
    real score the constants' probabilities are exactly 0 (exp(-1e5 - lse) underflows), and a row
    made of constants only (lse at a mask constant) gets no score gradient at all (its dO is
    zeroed for ds, not for dv)."""
    cdt = compute_dtype(q.dtype)
    if saved is None:
        layout = _layout(q_idx, k_idx, q.shape[2], chunk_length, chunks_before, chunks_after)
        q_padded, k_buffer, v_buffer = _gathered(q, k, v, layout, cdt)
        probs, lse = _probabilities(q_padded, k_buffer, q_idx, layout, key_mask, causal, self_mask, scale,
                                    mask_value, self_mask_value, chunks_before)
        attend = None
    else:
        layout, q_padded, k_buffer, v_buffer, probs, attend, lse = saved
    batch, heads, seq, chunks, length, width, padded = layout.shape
    groups = batch * heads
    real = layout.real.view(1, -1, 1)
    value_dim = v.shape[-1]
    # output gradient of every padded query row, zero for the spare rows
    grad_out = _gather_rows(grad_out_rounds, layout.q_source, cdt).view(groups, -1, value_dim).mul_(real)
    grad_out = grad_out.view(-1, length, value_dim)
    grad_v_buffer = _slab_products(attend if attend is not None else probs, grad_out, layout, value_dim)
    # rows of mask constants only: no score gradient (their dO zeroed for ds, kept for dv)
    live = lse > (self_mask_value if self_mask else mask_value) / 2  # [G*P, L, 1]
    grad_out_live = grad_out * live
    out = _gather_rows(out_rounds, layout.q_source, cdt).view(-1, length, value_dim)
    delta = (grad_out_live * out).sum(-1, keepdim=True)
    if grad_lse_rounds is not None:
        grad_lse = grad_lse_rounds.reshape(-1).take(layout.q_source).view(-1, length, 1).to(cdt)
        delta -= grad_lse.view(groups, -1, 1).mul_(real).view(-1, length, 1) * live
    grad_scores = torch.bmm(grad_out_live, _windows(v_buffer, layout).transpose(1, 2))
    if attend is not None:
        # dropout: attend = probs * keep / (1 - p), so d(probs) = d(attend) * attend / probs
        grad_scores.mul_(torch.where(probs > 0, attend / probs, torch.zeros_like(probs)))
    grad_scores.sub_(delta).mul_(probs)
    if scale != 1.0:
        grad_scores.mul_(scale)
    grad_k_buffer = _slab_products(grad_scores, q_padded, layout, q.shape[-1])
    grad_q_padded = torch.bmm(grad_scores, _windows(k_buffer, layout))
    return (_unsort(grad_q_padded, layout.q_inverse, layout),
            _unsort(_fold_buffer(grad_k_buffer, layout, chunks_before), layout.k_inverse, layout),
            _unsort(_fold_buffer(grad_v_buffer, layout, chunks_before), layout.k_inverse, layout))


def _slab_products(weights, rows, layout, width_out):
    """Gradient of the key-buffer rows from weights [G*P, L, W*L] and rows [G*P, L, X]: window
    slab w of query chunk g is buffer chunk g + w, so slab w's product lands shifted by w chunks."""
    length, width = layout.shape[4], layout.shape[5]
    chunks_total = weights.shape[0]
    out = rows.new_empty(((chunks_total + width - 1) * length, width_out))
    out[chunks_total * length:].zero_()  # only the trailing W - 1 chunks: slab 0 writes the rest
    scratch = None
    for slot in range(width):  # window offsets, not chunks
        slab = weights[:, :, slot * length:(slot + 1) * length].transpose(1, 2)
        if slot == 0:
            torch.bmm(slab, rows, out=out[:chunks_total * length].view(chunks_total, length, width_out))
            continue
        scratch = torch.bmm(slab, rows, out=scratch)
        out[slot * length:(slot + chunks_total) * length] += scratch.view(-1, width_out)
    return out


def _fold_buffer(buffer_rows, layout, before):
    """Key-buffer gradient [(G*P + W - 1) * L, X] -> sorted rows [G*N, X]: padded chunk p of a
    group is sorted chunk (p - before) mod C, so the wrap-around copies add onto their chunk."""
    batch, heads, seq, chunks, length, width, padded = layout.shape
    groups = batch * heads
    x = buffer_rows.shape[-1]
    chunked = buffer_rows[:groups * padded * length].view(groups, padded, length, x)
    total = chunked[:, before:before + chunks].clone()
    for copy in [*range(before), *range(before + chunks, padded)]:  # the W - 1 wrap-around copies
        total[:, (copy - before) % chunks] += chunked[:, copy]
    return total.view(-1, x)


def _unsort(rows, inverse, layout):
    """Per-sorted-row gradients (nh copies of each position) -> [B, H, S, X]: one gather through
    the inverse permutation, then the sum over rounds."""
    batch, heads, seq = layout.shape[:3]
    width = rows.shape[-1]
    gathered = torch.nn.functional.embedding(inverse, rows.reshape(-1, width))
    return gathered.view(batch, heads, -1, seq, width).sum(2)



# ------------------------------------------------------------------------- windows longer than the sequence


def window_repeats_own_chunk(chunks: int, before: int, after: int) -> bool:
    """True when transformers' window is not the cyclic one the fast layout assumes: its
    `_look_adjacent` concatenates torch.cat([x[:, :, i:], x[:, :, :i]]) for i = -before .. after,
    which for |i| >= chunks is x itself (the query's own chunk), not chunk i modulo chunks. The two
    differ only when before or after exceeds the number of chunks."""
    return before > chunks or after > chunks


def window_offsets(chunks: int, before: int, after: int) -> list[int]:
    """Chunk offset of every window step as transformers' _look_adjacent builds it (see above)."""
    return [i if -chunks < i < chunks else 0 for i in range(-before, after + 1)]


def _general_core(q, k, v, q_idx, k_idx, key_mask, chunk_length, chunks_before, chunks_after, causal, self_mask,
                  scale, mask_value, self_mask_value, dropout_p=0.0):
    """The core for any window, differentiable plain torch in transformers' layout: each query chunk's
    W windows gathered explicitly ([B, H, C, W*L, D], what transformers materialises), masks,
    logsumexp, exp(s - lse), dropout over [B, H, C, L, W*L] as transformers draws it. Serves the
    windows the fast layout cannot (window_repeats_own_chunk): they only occur when the window is
    longer than the whole sorted sequence, so the explicit windows stay small.
    -> out_rounds [B, H, nh, S, Dv] (v's dtype), lse_rounds [B, H, nh, S] (compute dtype)."""
    batch, heads, seq = q.shape[:3]
    total = q_idx.shape[-1]
    length = chunk_length
    chunks, rounds = total // length, total // seq
    device = q.device
    cdt = compute_dtype(q.dtype)
    offsets = torch.tensor(window_offsets(chunks, chunks_before, chunks_after), device=device)
    window_chunks = torch.remainder(torch.arange(chunks, device=device).view(-1, 1) + offsets, chunks)  # [C, W]
    window_slots = (window_chunks.unsqueeze(-1) * length + torch.arange(length, device=device)).reshape(-1)
    span = window_chunks.shape[1] * length
    q_pos = q_idx.reshape(batch, heads, chunks, length)
    k_pos = k_idx.reshape(batch, heads, total).index_select(-1, window_slots)  # [B, H, C * W*L]

    def rows(tensor, positions):
        index = positions.reshape(batch, heads, -1, 1).expand(-1, -1, -1, tensor.shape[-1])
        return torch.gather(tensor.to(cdt), 2, index)

    query = rows(q, q_idx).view(batch, heads, chunks, length, -1)
    key = rows(k, k_pos).view(batch, heads, chunks, span, -1)
    value = rows(v, k_pos).view(batch, heads, chunks, span, -1)
    k_pos = k_pos.view(batch, heads, chunks, 1, span)
    dots = torch.matmul(query, key.transpose(-1, -2))
    if scale != 1.0:
        dots = dots * scale
    dropped = None
    if key_mask is not None:
        keep = torch.gather(key_mask.to(torch.bool)[:, None, :].expand(-1, heads, -1), 2,
                            k_pos.reshape(batch, heads, -1))
        dropped = ~keep.view(batch, heads, chunks, 1, span)
    if causal:
        future = q_pos.unsqueeze(-1) < k_pos
        dropped = future if dropped is None else dropped | future
    if dropped is not None:
        dots = dots.masked_fill(dropped, mask_value)
    if self_mask:  # last, as transformers: also over masked keys
        dots = dots.masked_fill(q_pos.unsqueeze(-1) == k_pos, self_mask_value)
    lse = torch.logsumexp(dots, dim=-1, keepdim=True)
    probs = torch.exp(dots - lse)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    out = torch.matmul(probs, value).reshape(batch, heads, total, -1)
    # back to (round, original position): sorted slot t holds round t // S, position q_idx[t]
    dest = torch.arange(total, device=device).div(seq, rounding_mode="floor").mul_(seq) + q_idx.reshape(
        batch, heads, total)
    inverse = torch.argsort(dest, dim=-1)
    out_rounds = torch.gather(out, 2, inverse.unsqueeze(-1).expand(-1, -1, -1, out.shape[-1]))
    lse_rounds = torch.gather(lse.reshape(batch, heads, total), 2, inverse)
    return (out_rounds.view(batch, heads, rounds, seq, -1).to(v.dtype), lse_rounds.view(batch, heads, rounds, seq))


def _general_recorded(q, k, v, q_idx, k_idx, key_mask, config, dropout_p=0.0):
    """_general_core with its vector-Jacobian product (torch.func.vjp: it records also inside a
    custom op's kernel, where autograd does not): ((out_rounds, lse_rounds), vjp)."""

    def core(q_, k_, v_):
        return _general_core(q_, k_, v_, q_idx, k_idx, key_mask, *config, dropout_p=dropout_p)

    with torch.autocast(q.device.type, enabled=False):  # as _forward_impl: the op's own compute dtype
        return torch.func.vjp(core, q, k, v)


def _general_grads(outputs, vjp, grad_out_rounds, grad_lse_rounds, like):
    """(dq, dk, dv) in the compute dtype through the vjp of _general_recorded; a missing output
    gradient counts as zeros."""
    out_rounds, lse_rounds = outputs
    cotangents = (torch.zeros_like(out_rounds) if grad_out_rounds is None else grad_out_rounds.to(out_rounds.dtype),
                  torch.zeros_like(lse_rounds) if grad_lse_rounds is None else grad_lse_rounds.to(lse_rounds.dtype))
    cdt = compute_dtype(like.dtype)
    return tuple(grad.to(cdt) for grad in vjp(cotangents))


def _irregular(q, q_idx, chunk_length, chunks_before, chunks_after) -> bool:
    return window_repeats_own_chunk(q_idx.shape[-1] // chunk_length, chunks_before, chunks_after)


class EagerChunkedAttention(torch.autograd.Function):
    """The torch core under plain autograd for eager calls: saves the probabilities (no recompute);
    the only path with dropout."""

    @staticmethod
    def forward(ctx, q, k, v, q_idx, k_idx, key_mask, config, dropout_p):
        ctx.config = config
        ctx.general = None
        if _irregular(q, q_idx, *config[:3]):
            # a window longer than the sequence (transformers repeats the query's own chunk there):
            # the explicit-window core, its graph kept for the backward (its dropout mask included)
            ctx.general = _general_recorded(q, k, v, q_idx, k_idx, key_mask, config, dropout_p)
            ctx.dtypes = (q.dtype, k.dtype, v.dtype)
            ctx.save_for_backward(q, k, v)  # not read: ties a create_graph backward to the inputs
            return ctx.general[0]
        out_rounds, lse_rounds, saved = _forward_impl(q, k, v, q_idx, k_idx, key_mask, *config, dropout_p=dropout_p)
        ctx.save_for_backward(q, k, v, q_idx, k_idx, key_mask, out_rounds)
        ctx.saved_probs = saved
        ctx.config = config
        return out_rounds, lse_rounds

    @staticmethod
    @once_differentiable("lsh_attention")
    def backward(ctx, grad_out_rounds, grad_lse_rounds):
        if ctx.general is not None:
            outputs, vjp = ctx.general
            ctx.general = None
            grads = _general_grads(outputs, vjp, grad_out_rounds, grad_lse_rounds, outputs[0])
            dq, dk, dv = (grad.to(dtype) for grad, dtype in zip(grads, ctx.dtypes))
            return dq, dk, dv, None, None, None, None, None
        q, k, v, q_idx, k_idx, key_mask, out_rounds = ctx.saved_tensors
        grads = _backward_impl(grad_out_rounds, grad_lse_rounds, q, k, v, q_idx, k_idx, key_mask, out_rounds,
                               *ctx.config, saved=ctx.saved_probs)
        ctx.saved_probs = None
        dq, dk, dv = (grad.to(like.dtype) for grad, like in zip(grads, (q, k, v)))
        return dq, dk, dv, None, None, None, None, None
