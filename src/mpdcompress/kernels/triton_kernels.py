"""Triton kernels of the packed layer: one launch computes every block of one layer.

Both kernels address activations through index vectors instead of permuting them first:

* ``in_index[k * COLS + j]`` is the position, in the layer's input, of column ``j`` of block
  ``k`` (``-1`` for a padding column of an uneven layout);
* ``out_index[k * ROWS + i]`` is the position, in the layer's output, of row ``i`` of block
  ``k`` (``-1`` for a padding row, which is never stored).

Activations are 2-D ``(batch, features)`` with any strides. Between the layers of a chain they
are feature-major (the batch stride is 1), so each gathered feature is a contiguous run of the
batch: the gather is a coalesced row load, not a scattered element load (measured on an H100 for
one 4096² bf16 layer at 8192 rows: 103 µs gathering rows, 3.2 ms gathering single features).

``_block_linear`` serves the forward (``y = act(x W_kᵀ + b)``) and, with the weight strides
swapped and the index roles exchanged, the input gradient (``dx = dz W_k``). Its variants (the
tuner picks by measurement): swapped operands for small batches, split K (with
``_split_k_sum``) for batch 1.
``_block_weight_grad`` computes ``dW_k = dz_kᵀ x_k`` over the same gathered operands.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Epilogue codes, shared with the launcher.
ACT_NONE, ACT_RELU, ACT_GELU, ACT_GELU_TANH, ACT_SILU = 0, 1, 2, 3, 4


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Triton's interpreter multiplies bfloat16 tiles as their raw 16-bit patterns; products of
    # two bf16 values are exact in fp32, so upcasting there computes what the tensor cores do.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _activate(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        # tanh(u) = 2 sigmoid(2u) - 1; tanh itself is not in every Triton backend.
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        z = 0.5 * z * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0))
    elif ACT == 4:
        z = z / (1.0 + tl.exp(-z))
    return z


@triton.jit
def _on_batch(v, SWAP_AB: tl.constexpr):
    """``v`` along a tile's batch axis: its rows, or its columns when swapped."""
    if SWAP_AB:
        t = v[None, :]
    else:
        t = v[:, None]
    return t


@triton.jit
def _on_rows(v, SWAP_AB: tl.constexpr):
    """``v`` along the tile's other axis (a block's rows in outputs, its columns in operands)."""
    if SWAP_AB:
        t = v[:, None]
    else:
        t = v[None, :]
    return t


@triton.jit
def _dequantized(
    w_block,
    s_block,
    z_block,
    ks,
    mask,
    stride_wk,
    GROUP,
    BITS: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """A weight tile of integer blocks in float, ``ks`` the tile's inputs along its K axis: the
    integers (int8, or 4-bit nibbles low first, minus 8 or the group's zero point) times the
    group's scale, rounded to ``DTYPE`` (the scale's type), the values of
    ``QuantizedWeight.dequantize`` (masked positions are zero)."""
    if BITS == 8:
        q = tl.load(w_block + ks * stride_wk, mask=mask, other=0).to(tl.int32)
    else:
        byte = tl.load(w_block + (ks // 2) * stride_wk, mask=mask, other=0).to(tl.int32)
        q = (byte >> ((ks % 2) * 4)) & 15
        if HAS_ZEROS:
            q = q - tl.load(z_block + ks // GROUP, mask=mask, other=0).to(tl.int32)
        else:
            q = q - 8
    # In fp32, then rounded once: a product of an integer of at most 8 bits and a 16-bit float is
    # exact in fp32, so this rounds as a product in the scale's own type does (and Triton's
    # interpreter has no 16-bit float arithmetic).
    scale = tl.load(s_block + ks // GROUP, mask=mask, other=0.0).to(tl.float32)
    return (q.to(tl.float32) * scale).to(DTYPE)


@triton.jit
def _block_linear(
    x_ptr,
    in_index_ptr,
    w_ptr,
    bias_ptr,
    out_index_ptr,
    y_ptr,
    part_ptr,
    gate_ptr,
    scale_ptr,
    zero_ptr,
    batch,
    ROWS,
    COLS,
    stride_xb,
    stride_xf,
    stride_yb,
    stride_yf,
    stride_wc,
    stride_wr,
    stride_wk,
    stride_gb,
    stride_gf,
    stride_sc,
    stride_sr,
    GROUP,
    BITS: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Program (tile, k, split): rows ``BLOCK_R`` of block ``k`` for ``BLOCK_B`` batch entries.

    ``SWAP_AB`` computes ``yᵀ = W_k · xᵀ``: the block's rows are the MMA's M dimension, so a
    batch of 16 still fills Hopper's warpgroup MMA (which needs M ≥ 64), and the tile is already
    feature-major for the store. ``SPLIT_K`` > 1 gives each program a share of the block's
    columns, so a batch of 1 streams the weights with ``SPLIT_K`` times the programs; the raw
    fp32 sums go to ``part`` (``(SPLIT_K · c · ROWS, batch)``, block-row order) and
    :func:`_split_k_sum` adds them up, adds the bias, applies the epilogue and scatters them.
    ``GATED`` (input gradients through a ReLU): ``x`` counts only where ``gate`` (the forward's
    output, laid out like ``x``'s positions) is positive, so ``dz · 1[z > 0]`` is never stored.
    ``BITS`` 8 or 4: the blocks are integers (``QuantizedWeight``: ``scale`` per row and group of
    ``GROUP`` inputs, ``zero`` points if ``HAS_ZEROS``) dequantized as their tiles load, so no
    float copy of the blocks is written or read; 0: float blocks."""
    pid = tl.program_id(0)
    blk = tl.program_id(1)
    # Tiles are (batch, rows) or, swapped, (rows, batch); operands follow: x (batch, K) or
    # (K, batch), W (K, rows) or (rows, K): K lies on the batch axis of W's tile.
    tiles_b = tl.cdiv(batch, BLOCK_B)
    # Batch tiles vary fastest, so programs running together share a weight tile in L2.
    pid_b = pid % tiles_b
    pid_r = pid // tiles_b
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    in_batch = offs_b < batch
    in_rows = offs_r < ROWS
    x_rows = x_ptr + _on_batch(offs_b.to(tl.int64) * stride_xb, SWAP_AB)
    w_block = w_ptr + blk.to(tl.int64) * stride_wc + _on_rows(offs_r * stride_wr, SWAP_AB)
    s_block = scale_ptr + blk.to(tl.int64) * stride_sc + _on_rows(offs_r * stride_sr, SWAP_AB)
    z_block = zero_ptr + blk.to(tl.int64) * stride_sc + _on_rows(offs_r * stride_sr, SWAP_AB)
    if SWAP_AB:
        acc = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
    if SPLIT_K == 1:
        k_begin = 0
        k_end = COLS
    else:
        # Whole BLOCK_K steps per split, so the splits' ranges never overlap.
        per_split = tl.cdiv(tl.cdiv(COLS, BLOCK_K), SPLIT_K) * BLOCK_K
        k_begin = tl.program_id(2) * per_split
        k_end = tl.minimum(COLS, k_begin + per_split)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + offs_k
        src = tl.load(in_index_ptr + blk * COLS + ks, mask=ks < COLS, other=-1)
        in_tile = _on_batch(in_batch, SWAP_AB) & _on_rows(src >= 0, SWAP_AB)
        a = tl.load(x_rows + _on_rows(src.to(tl.int64) * stride_xf, SWAP_AB), mask=in_tile, other=0.0)
        if GATED:
            gate = tl.load(
                gate_ptr
                + _on_batch(offs_b.to(tl.int64) * stride_gb, SWAP_AB)
                + _on_rows(src.to(tl.int64) * stride_gf, SWAP_AB),
                mask=in_tile,
                other=0.0,
            )
            a = tl.where(gate > 0, a, 0.0).to(a.dtype)
        w_mask = _on_batch(ks < COLS, SWAP_AB) & _on_rows(in_rows, SWAP_AB)
        if BITS == 0:
            w = tl.load(w_block + _on_batch(ks * stride_wk, SWAP_AB), mask=w_mask, other=0.0)
        else:
            w = _dequantized(
                w_block,
                s_block,
                z_block,
                _on_batch(ks, SWAP_AB),
                w_mask,
                stride_wk,
                GROUP,
                BITS,
                HAS_ZEROS,
                x_ptr.dtype.element_ty,
            )
        if SWAP_AB:
            acc = _mma(w, a, acc, PRECISION, UPCAST)
        else:
            acc = _mma(a, w, acc, PRECISION, UPCAST)
    keep = _on_batch(in_batch, SWAP_AB) & _on_rows(in_rows, SWAP_AB)
    if SPLIT_K > 1:
        part = part_ptr + ((tl.program_id(2) * tl.num_programs(1) + blk) * ROWS).to(tl.int64) * batch
        tl.store(part + _on_rows(offs_r.to(tl.int64) * batch, SWAP_AB) + _on_batch(offs_b, SWAP_AB), acc, mask=keep)
    else:
        if HAS_BIAS:
            acc += _on_rows(tl.load(bias_ptr + blk * ROWS + offs_r, mask=in_rows, other=0.0).to(tl.float32), SWAP_AB)
        acc = _activate(acc, ACT)
        dst = tl.load(out_index_ptr + blk * ROWS + offs_r, mask=in_rows, other=-1)
        y = (
            y_ptr
            + _on_batch(offs_b.to(tl.int64) * stride_yb, SWAP_AB)
            + _on_rows(dst.to(tl.int64) * stride_yf, SWAP_AB)
        )
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=keep & _on_rows(dst >= 0, SWAP_AB))


@triton.jit
def _split_k_sum(
    part_ptr,
    bias_ptr,
    out_index_ptr,
    y_ptr,
    batch,
    FEATURES,
    stride_yb,
    stride_yf,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Second half of a split-K launch: ``y[:, out_index] = act(Σ_splits part + bias)``, in a
    fixed order (no atomics), so results do not depend on scheduling."""
    offs_f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_f = offs_f < FEATURES
    keep = in_f[:, None] & (offs_b < batch)[None, :]
    acc = tl.zeros((BLOCK_F, BLOCK_B), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        rows = (split * FEATURES + offs_f).to(tl.int64) * batch
        acc += tl.load(part_ptr + rows[:, None] + offs_b[None, :], mask=keep, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_f, mask=in_f, other=0.0).to(tl.float32)[:, None]
    acc = _activate(acc, ACT)
    dst = tl.load(out_index_ptr + offs_f, mask=in_f, other=-1)
    y = y_ptr + offs_b.to(tl.int64)[None, :] * stride_yb + dst.to(tl.int64)[:, None] * stride_yf
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=keep & (dst >= 0)[:, None])


@triton.jit
def _block_weight_grad(
    dz_ptr,
    out_index_ptr,
    x_ptr,
    in_index_ptr,
    dw_ptr,
    gate_ptr,
    db_ptr,
    batch,
    ROWS,
    COLS,
    stride_zb,
    stride_zf,
    stride_xb,
    stride_xf,
    stride_gb,
    stride_gf,
    GATED: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Program (tile, k): ``dW_k[rows, cols] = Σ_batch dz[batch, rows]ᵀ x[batch, cols]``, padding zero.

    ``GATED``: ``dz`` counts only where ``gate`` (the forward's output) is positive (ReLU).
    ``BIAS_GRAD``: the programs of the first column tile also store ``db_k[rows] = Σ_batch dz``,
    so neither the gated ``dz`` nor the bias gradient costs a launch of its own."""
    pid = tl.program_id(0)
    blk = tl.program_id(1)
    tiles_k = tl.cdiv(COLS, BLOCK_K)
    pid_r = pid // tiles_k
    pid_k = pid % tiles_k
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, BLOCK_B)
    rows = tl.load(out_index_ptr + blk * ROWS + offs_r, mask=offs_r < ROWS, other=-1)
    cols = tl.load(in_index_ptr + blk * COLS + offs_k, mask=offs_k < COLS, other=-1)
    dz_rows = dz_ptr + rows.to(tl.int64)[:, None] * stride_zf
    x_cols = x_ptr + cols.to(tl.int64)[None, :] * stride_xf
    gate_rows = gate_ptr + rows.to(tl.int64)[:, None] * stride_gf
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for b0 in range(0, batch, BLOCK_B):
        bs = (b0 + offs_b).to(tl.int64)
        in_batch = bs < batch
        in_tile = (rows >= 0)[:, None] & in_batch[None, :]
        dz = tl.load(dz_rows + bs[None, :] * stride_zb, mask=in_tile, other=0.0)
        if GATED:
            gate = tl.load(gate_rows + bs[None, :] * stride_gb, mask=in_tile, other=0.0)
            dz = tl.where(gate > 0, dz, 0.0).to(dz.dtype)
        if BIAS_GRAD:
            db += tl.sum(dz.to(tl.float32), axis=1)
        x = tl.load(x_cols + bs[:, None] * stride_xb, mask=in_batch[:, None] & (cols >= 0)[None, :], other=0.0)
        acc = _mma(dz, x, acc, PRECISION, UPCAST)
    dw = dw_ptr + blk.to(tl.int64) * ROWS * COLS + offs_r[:, None] * COLS + offs_k[None, :]
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=(offs_r < ROWS)[:, None] & (offs_k < COLS)[None, :])
    if BIAS_GRAD:
        first_tile = (tl.zeros_like(offs_r) + pid_k) == 0  # as a vector: a scalar mask is not portable
        tl.store(db_ptr + blk * ROWS + offs_r, db.to(db_ptr.dtype.element_ty), mask=(offs_r < ROWS) & first_tile)
