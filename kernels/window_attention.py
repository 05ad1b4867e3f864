"""Triton kernels for window attention (Swin W-MSA / SW-MSA, Swin V2 cosine attention, Video Swin 3D windows).

One program per (batch, window, head [, query block]). A program finds its window's tokens by index arithmetic on
its grid position: the cyclic shift, the padding of sizes the window does not divide, the partition and its reverse
are never copies. Queries, keys and values are read by strides where they lie (any layout, including the three
views of one qkv projection), padding tokens take pad_k / pad_v, the relative position bias is gathered from its
table by the window coordinates (or read from the dense [heads, N, N] bias), the shift mask is recomputed from the
region labels, and the output and the per-token log-sum-exp are stored straight into the token layout.

2D problems run as 3D ones with T = 1 and a window of depth 1: one kernel serves both, and every formula (the
table index included) reduces to the 2D one.

Softmax statistics and accumulators are float32. fp32 inputs use input_precision="ieee" in tl.dot: on the GPU
the default TF32 would be less accurate than the fp32 reference it is compared with.

The geometry of pyvl.ops.window_attention's docstring, per spatial dim (S size, W window, s shift, Sp padded size):
  pad_first:     grid position r holds padded position p = (r + s) mod Sp, a token if p < S
  not pad_first: r holds token (r + s) mod S if r < S, else padding
  region label (s > 0): 0 if r < Sp - W, 1 if r < Sp - s, else 2
The launchers only allocate outputs, pick block sizes and launch; argument checks live in pyvl.ops.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG_MAX_LOGIT_SCALE = math.log(100.0)  # Swin V2 clamps logit_scale at log(1 / 0.01)
NORM_EPS = 1e-12  # F.normalize's eps

BIAS_NONE, BIAS_TABLE, BIAS_DENSE = 0, 1, 2


# ----------------------------------------------------------------------------------------------------------------
# Geometry


@triton.jit
def _grid_dim(r, S, s, W: tl.constexpr, PAD_FIRST: tl.constexpr):
    """For window-grid positions r along one dim: (token index, is a real token, shift-mask region label)."""
    Sp = (S + W - 1) // W * W
    if PAD_FIRST:
        p = r + s
        p = tl.where(p >= Sp, p - Sp, p)
        real = p < S
    else:
        real = r < S
        p = r + s
        p = tl.where(p >= S, p - S, p)
    label = tl.where(s > 0, (r >= Sp - W).to(tl.int32) + (r >= Sp - s).to(tl.int32), 0)
    return p, real, label


@triton.jit
def _window_tokens(i, win0, win1, win2, S0, S1, S2, s0, s1, s2,
                   W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, PAD_FIRST: tl.constexpr):
    """Window-local indices i (row-major over the window) of window (win0, win1, win2): the token coordinates, a
    mask of real tokens (False for padding and for i >= N), the combined region label and the window coordinates."""
    N: tl.constexpr = W0 * W1 * W2
    c0 = i // (W1 * W2)
    c1 = (i // W2) % W1
    c2 = i % W2
    t0, real0, lab0 = _grid_dim(win0 * W0 + c0, S0, s0, W0, PAD_FIRST)
    t1, real1, lab1 = _grid_dim(win1 * W1 + c1, S1, s1, W1, PAD_FIRST)
    t2, real2, lab2 = _grid_dim(win2 * W2 + c2, S2, s2, W2, PAD_FIRST)
    real = real0 & real1 & real2 & (i < N)
    return t0, t1, t2, real, lab0 * 9 + lab1 * 3 + lab2, c0, c1, c2


@triton.jit
def _program_window(pid, heads, S0, S1, S2, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr):
    """(batch, head, window coordinates) of a program id laid out as ((batch * nW + window) * heads + head)."""
    n0 = (S0 + W0 - 1) // W0
    n1 = (S1 + W1 - 1) // W1
    n2 = (S2 + W2 - 1) // W2
    h = pid % heads
    rest = pid // heads
    win = rest % (n0 * n1 * n2)
    b = rest // (n0 * n1 * n2)
    return b, h, win // (n1 * n2), (win // n2) % n1, win % n2


@triton.jit
def _load_rows(ptr, b, t0, t1, t2, h, sb, st, sh, sw, sn, sd, real, offs_d, d):
    """[rows, BLOCK_D] of the tokens (t0, t1, t2) of batch b, head h; zeros where not real or beyond d."""
    offs = (b.to(tl.int64) * sb + h.to(tl.int64) * sn + t0.to(tl.int64) * st + t1.to(tl.int64) * sh
            + t2.to(tl.int64) * sw)
    return tl.load(ptr + offs[:, None] + offs_d[None, :].to(tl.int64) * sd,
                   mask=real[:, None] & (offs_d[None, :] < d), other=0.0)


@triton.jit
def _token_offsets(b, t0, t1, t2, h, sb, st, sh, sw, sn):
    return (b.to(tl.int64) * sb + h.to(tl.int64) * sn + t0.to(tl.int64) * st + t1.to(tl.int64) * sh
            + t2.to(tl.int64) * sw)


@triton.jit
def _keys(k_ptr, v_ptr, pad_k_ptr, pad_v_ptr, b, h, j, t0, t1, t2, real,
          skb, skt, skh, skw, skn, skd, svb, svt, svh, svw, svn, svd, spk_h, spk_d, spv_h, spv_d,
          offs_d, d, N: tl.constexpr, HAS_PAD: tl.constexpr):
    """Keys and values of window slots j: the tokens where real, pad_k / pad_v (or zeros) at padding slots."""
    kb = _load_rows(k_ptr, b, t0, t1, t2, h, skb, skt, skh, skw, skn, skd, real, offs_d, d)
    vb = _load_rows(v_ptr, b, t0, t1, t2, h, svb, svt, svh, svw, svn, svd, real, offs_d, d)
    if HAS_PAD:
        pad_slot = (j < N) & (real == 0)
        dmask = offs_d < d
        pk = tl.load(pad_k_ptr + h * spk_h + offs_d * spk_d, mask=dmask, other=0.0)
        pv = tl.load(pad_v_ptr + h * spv_h + offs_d * spv_d, mask=dmask, other=0.0)
        kb = tl.where(pad_slot[:, None], pk[None, :], kb)
        vb = tl.where(pad_slot[:, None], pv[None, :], vb)
    return kb, vb


@triton.jit
def _normalize(x):
    """Rows of x divided by max(|row|, eps) in float32 (F.normalize), and max(|row|, eps), |row|."""
    xf = x.to(tl.float32)
    norm = tl.sqrt(tl.sum(xf * xf, axis=1))
    clamped = tl.maximum(norm, 1e-12)
    return xf / clamped[:, None], clamped, norm


@triton.jit
def _mm(a, b, DT: tl.constexpr):
    """a @ b in float32; the operands in the input dtype DT (ieee products for float32, see the module docstring)."""
    if DT == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _tau(ls_ptr, h, sls):
    """exp(min(logit_scale[h], log 100)), and whether the clamp passes the gradient (logit_scale <= log 100)."""
    ls = tl.load(ls_ptr + h * sls).to(tl.float32)
    return tl.exp(tl.minimum(ls, 4.605170185988092)), ls <= 4.605170185988092


@triton.jit
def _logits(qm, kn, tau, scale, mask_value, h, i, j, ci0, ci1, ci2, lab_i, cj0, cj1, cj2, lab_j,
            table_ptr, stab_r, stab_h, bias_ptr, sbias_h, sbias_i, sbias_j,
            DT: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
            BIAS: tl.constexpr, COSINE: tl.constexpr):
    """Logits of window slots i (rows) against j (columns), float32, -inf at columns j >= N; and the raw products
    qm . kn (the cosines when COSINE), which the logit_scale gradient needs."""
    N: tl.constexpr = W0 * W1 * W2
    raw = _mm(qm, tl.trans(kn), DT)
    if COSINE:
        s = raw * tau
    else:
        s = raw * scale
    if BIAS == 1:
        idx = ((ci0[:, None] - cj0[None, :] + (W0 - 1)) * ((2 * W1 - 1) * (2 * W2 - 1))
               + (ci1[:, None] - cj1[None, :] + (W1 - 1)) * (2 * W2 - 1)
               + (ci2[:, None] - cj2[None, :] + (W2 - 1)))
        inside = (i[:, None] < N) & (j[None, :] < N)
        s += tl.load(table_ptr + idx * stab_r + h * stab_h, mask=inside, other=0.0).to(tl.float32)
    elif BIAS == 2:
        inside = (i[:, None] < N) & (j[None, :] < N)
        s += tl.load(bias_ptr + h * sbias_h + i[:, None] * sbias_i + j[None, :] * sbias_j, mask=inside,
                     other=0.0).to(tl.float32)
    s = tl.where(lab_i[:, None] != lab_j[None, :], s + mask_value, s)
    s = tl.where(j[None, :] < N, s, float("-inf"))
    return s, raw


# ----------------------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _window_attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, table_ptr, bias_ptr, ls_ptr, pad_k_ptr, pad_v_ptr,
        S0, S1, S2, s0, s1, s2, heads, d,
        sqb, sqt, sqh, sqw, sqn, sqd, skb, skt, skh, skw, skn, skd, svb, svt, svh, svw, svn, svd,
        sob, sot, soh, sow, son, slb, slt, slh, slw, sln,
        stab_r, stab_h, sbias_h, sbias_i, sbias_j, sls, spk_h, spk_d, spv_h, spv_d,
        scale, mask_value,
        W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, PAD_FIRST: tl.constexpr, BIAS: tl.constexpr,
        COSINE: tl.constexpr, HAS_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Grid: (batch, window, head) x query blocks; key blocks stream through an online softmax (flash attention),
    # so Video Swin's 8x7x7 = 392-token windows never hold an N x N tile.
    DT: tl.constexpr = q_ptr.dtype.element_ty
    N: tl.constexpr = W0 * W1 * W2
    NUM_M: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    mblock = pid % NUM_M
    b, h, win0, win1, win2 = _program_window(pid // NUM_M, heads, S0, S1, S2, W0, W1, W2)
    offs_d = tl.arange(0, BLOCK_D)
    i = mblock * BLOCK_M + tl.arange(0, BLOCK_M)
    qt0, qt1, qt2, q_real, lab_i, ci0, ci1, ci2 = _window_tokens(i, win0, win1, win2, S0, S1, S2, s0, s1, s2,
                                                                W0, W1, W2, PAD_FIRST)
    qb = _load_rows(q_ptr, b, qt0, qt1, qt2, h, sqb, sqt, sqh, sqw, sqn, sqd, q_real, offs_d, d)
    tau = 1.0
    if COSINE:
        tau, ls_open = _tau(ls_ptr, h, sls)
        qn, q_clamped, q_norm = _normalize(qb)
        qb = qn.to(DT)  # the dot's operand in the input dtype, as F.normalize would give it
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(0, N, BLOCK_N):
        j = start_n + tl.arange(0, BLOCK_N)
        kt0, kt1, kt2, k_real, lab_j, cj0, cj1, cj2 = _window_tokens(j, win0, win1, win2, S0, S1, S2, s0, s1, s2,
                                                                    W0, W1, W2, PAD_FIRST)
        kb, vb = _keys(k_ptr, v_ptr, pad_k_ptr, pad_v_ptr, b, h, j, kt0, kt1, kt2, k_real,
                       skb, skt, skh, skw, skn, skd, svb, svt, svh, svw, svn, svd, spk_h, spk_d, spv_h, spv_d,
                       offs_d, d, N, HAS_PAD)
        if COSINE:
            kn, k_clamped, k_norm = _normalize(kb)
            kb = kn.to(DT)
        s, raw = _logits(qb, kb, tau, scale, mask_value, h, i, j, ci0, ci1, ci2, lab_i, cj0, cj1, cj2, lab_j,
                       table_ptr, stab_r, stab_h, bias_ptr, sbias_h, sbias_i, sbias_j, DT, W0, W1, W2, BIAS, COSINE)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a block whose keys are all masked with -inf leaves m at -inf: subtract 0 instead (exp(-inf) = 0, no NaN)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _mm(p, vb, DT)
        m_i = m_new
    out = acc / l_i[:, None]
    o_offs = _token_offsets(b, qt0, qt1, qt2, h, sob, sot, soh, sow, son)
    tl.store(out_ptr + o_offs[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=q_real[:, None] & (offs_d[None, :] < d))
    l_offs = _token_offsets(b, qt0, qt1, qt2, h, slb, slt, slh, slw, sln)
    tl.store(lse_ptr + l_offs, m_i + tl.log(l_i), mask=q_real)


# ----------------------------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _query_block(q_ptr, o_ptr, do_ptr, lse_ptr, b, h, i, win0, win1, win2, S0, S1, S2, s0, s1, s2,
                 sqb, sqt, sqh, sqw, sqn, sqd, sob, sot, soh, sow, son, slb, slt, slh, slw, sln,
                 offs_d, d, DT: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                 PAD_FIRST: tl.constexpr, COSINE: tl.constexpr, BLOCK_M: tl.constexpr):
    """What the backward needs of query slots i: the dot operand (q, or q normalized), dO, lse (+inf where no real
    query: its probabilities become 0), delta = rowsum(dO * O), and for cosine the norms for dq's projection."""
    qt0, qt1, qt2, q_real, lab_i, ci0, ci1, ci2 = _window_tokens(i, win0, win1, win2, S0, S1, S2, s0, s1, s2,
                                                                W0, W1, W2, PAD_FIRST)
    qb = _load_rows(q_ptr, b, qt0, qt1, qt2, h, sqb, sqt, sqh, sqw, sqn, sqd, q_real, offs_d, d)
    do = _load_rows(do_ptr, b, qt0, qt1, qt2, h, sob, sot, soh, sow, son, 1, q_real, offs_d, d)
    ob = _load_rows(o_ptr, b, qt0, qt1, qt2, h, sob, sot, soh, sow, son, 1, q_real, offs_d, d)
    delta = tl.sum(do.to(tl.float32) * ob.to(tl.float32), axis=1)
    lse = tl.load(lse_ptr + _token_offsets(b, qt0, qt1, qt2, h, slb, slt, slh, slw, sln), mask=q_real,
                  other=float("inf"))
    q_norm = tl.zeros((BLOCK_M,), tl.float32)
    q_clamped = q_norm
    qf = qb.to(tl.float32)
    if COSINE:
        qf, q_clamped, q_norm = _normalize(qb)
        qb = qf.to(DT)
    return (qb, qf, do, lse, delta, q_norm, q_clamped, qt0, qt1, qt2, q_real, lab_i, ci0, ci1, ci2)


@triton.jit
def _unnormalize_grad(g, xn, clamped, norm):
    """Gradient through F.normalize: from d(x / max(|x|, eps)) to dx, given xn = the normalized rows."""
    proj = tl.sum(g * xn, axis=1)
    g = g - tl.where(norm > 1e-12, proj, 0.0)[:, None] * xn
    return g / clamped[:, None]


@triton.jit
def _window_attention_bwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, table_ptr, bias_ptr, ls_ptr, pad_k_ptr, pad_v_ptr,
        dq_ptr, dk_ptr, dv_ptr, dbias_ptr, dls_ptr, dpad_k_ptr, dpad_v_ptr,
        S0, S1, S2, s0, s1, s2, heads, d,
        sqb, sqt, sqh, sqw, sqn, sqd, skb, skt, skh, skw, skn, skd, svb, svt, svh, svw, svn, svd,
        sob, sot, soh, sow, son, slb, slt, slh, slw, sln,
        stab_r, stab_h, sbias_h, sbias_i, sbias_j, sls, spk_h, spk_d, spv_h, spv_d,
        scale, mask_value,
        W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, PAD_FIRST: tl.constexpr, BIAS: tl.constexpr,
        COSINE: tl.constexpr, HAS_PAD: tl.constexpr,
        NEED_DQ: tl.constexpr, NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, NEED_DBIAS: tl.constexpr,
        NEED_DLS: tl.constexpr, NEED_DPAD_K: tl.constexpr, NEED_DPAD_V: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (batch, window, head) owns every token of its window, so dq, dk, dv need no atomics.
    # Pass 1 streams query blocks past each key block (dk, dv, and the bias / logit_scale / pad_kv terms); pass 2
    # streams key blocks past each query block for dq. A window that fits one block (Swin's 7x7 in 64) does all
    # of it in pass 1 from one probability tile. The bias gradient is summed over batches and windows by
    # float32 atomics into a [heads, N, N] accumulator; logit_scale and pad_kv get per-program partial sums
    # that the launcher reduces.
    DT: tl.constexpr = q_ptr.dtype.element_ty
    N: tl.constexpr = W0 * W1 * W2
    ONE_BLOCK: tl.constexpr = (N <= BLOCK_M) & (N <= BLOCK_N)
    pid = tl.program_id(0)
    b, h, win0, win1, win2 = _program_window(pid, heads, S0, S1, S2, W0, W1, W2)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < d
    tau = 1.0
    ls_open = True
    if COSINE:
        tau, ls_open = _tau(ls_ptr, h, sls)
    dls_acc = tl.zeros((BLOCK_N,), tl.float32)
    dpk_acc = tl.zeros((BLOCK_D,), tl.float32)
    dpv_acc = tl.zeros((BLOCK_D,), tl.float32)
    for start_n in range(0, N, BLOCK_N):
        j = start_n + tl.arange(0, BLOCK_N)
        kt0, kt1, kt2, k_real, lab_j, cj0, cj1, cj2 = _window_tokens(j, win0, win1, win2, S0, S1, S2, s0, s1, s2,
                                                                    W0, W1, W2, PAD_FIRST)
        kb, vb = _keys(k_ptr, v_ptr, pad_k_ptr, pad_v_ptr, b, h, j, kt0, kt1, kt2, k_real,
                       skb, skt, skh, skw, skn, skd, svb, svt, svh, svw, svn, svd, spk_h, spk_d, spv_h, spv_d,
                       offs_d, d, N, HAS_PAD)
        kf = kb.to(tl.float32)
        k_norm = tl.zeros((BLOCK_N,), tl.float32)
        k_clamped = k_norm
        if COSINE:
            kf, k_clamped, k_norm = _normalize(kb)
            kb = kf.to(DT)
        dk_acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv_acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for start_m in range(0, N, BLOCK_M):
            i = start_m + tl.arange(0, BLOCK_M)
            (qb, qf, do, lse, delta, q_norm, q_clamped, qt0, qt1, qt2, q_real, lab_i, ci0, ci1, ci2) = _query_block(
                q_ptr, o_ptr, do_ptr, lse_ptr, b, h, i, win0, win1, win2, S0, S1, S2, s0, s1, s2,
                sqb, sqt, sqh, sqw, sqn, sqd, sob, sot, soh, sow, son, slb, slt, slh, slw, sln,
                offs_d, d, DT, W0, W1, W2, PAD_FIRST, COSINE, BLOCK_M)
            s, raw = _logits(qb, kb, tau, scale, mask_value, h, i, j, ci0, ci1, ci2, lab_i, cj0, cj1, cj2, lab_j,
                             table_ptr, stab_r, stab_h, bias_ptr, sbias_h, sbias_i, sbias_j, DT, W0, W1, W2, BIAS,
                             COSINE)
            p = tl.exp(s - lse[:, None])
            dv_acc += _mm(tl.trans(p), do, DT)
            dp = _mm(do, tl.trans(vb), DT)
            ds = p * (dp - delta[:, None])
            dk_acc += _mm(tl.trans(ds), qb, DT)
            if NEED_DBIAS:
                inside = (i[:, None] < N) & (j[None, :] < N)
                tl.atomic_add(dbias_ptr + h * (N * N) + i[:, None] * N + j[None, :], ds, mask=inside)
            if NEED_DLS:
                dls_acc += tl.sum(ds * raw, axis=0)
            if ONE_BLOCK:
                if NEED_DQ:
                    dq = _mm(ds, kb, DT)
                    if COSINE:
                        dq = _unnormalize_grad(dq * tau, qf, q_clamped, q_norm)
                    else:
                        dq = dq * scale
                    dq_offs = _token_offsets(b, qt0, qt1, qt2, h, sob, sot, soh, sow, son)
                    tl.store(dq_ptr + dq_offs[:, None] + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
                             mask=q_real[:, None] & dmask[None, :])
        if COSINE:
            dk = _unnormalize_grad(dk_acc * tau, kf, k_clamped, k_norm)
        else:
            dk = dk_acc * scale
        kv_offs = _token_offsets(b, kt0, kt1, kt2, h, sob, sot, soh, sow, son)
        if NEED_DK:
            tl.store(dk_ptr + kv_offs[:, None] + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty),
                     mask=k_real[:, None] & dmask[None, :])
        if NEED_DV:
            tl.store(dv_ptr + kv_offs[:, None] + offs_d[None, :], dv_acc.to(dv_ptr.dtype.element_ty),
                     mask=k_real[:, None] & dmask[None, :])
        pad_slot = (j < N) & (k_real == 0)
        if NEED_DPAD_K:
            dpk_acc += tl.sum(tl.where(pad_slot[:, None], dk, 0.0), axis=0)
        if NEED_DPAD_V:
            dpv_acc += tl.sum(tl.where(pad_slot[:, None], dv_acc, 0.0), axis=0)
    if not ONE_BLOCK:
        if NEED_DQ:
            for start_m in range(0, N, BLOCK_M):
                i = start_m + tl.arange(0, BLOCK_M)
                (qb, qf, do, lse, delta, q_norm, q_clamped, qt0, qt1, qt2, q_real, lab_i, ci0, ci1,
                 ci2) = _query_block(
                    q_ptr, o_ptr, do_ptr, lse_ptr, b, h, i, win0, win1, win2, S0, S1, S2, s0, s1, s2,
                    sqb, sqt, sqh, sqw, sqn, sqd, sob, sot, soh, sow, son, slb, slt, slh, slw, sln,
                    offs_d, d, DT, W0, W1, W2, PAD_FIRST, COSINE, BLOCK_M)
                dq_acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
                for start_n in range(0, N, BLOCK_N):
                    j = start_n + tl.arange(0, BLOCK_N)
                    kt0, kt1, kt2, k_real, lab_j, cj0, cj1, cj2 = _window_tokens(
                        j, win0, win1, win2, S0, S1, S2, s0, s1, s2, W0, W1, W2, PAD_FIRST)
                    kb, vb = _keys(k_ptr, v_ptr, pad_k_ptr, pad_v_ptr, b, h, j, kt0, kt1, kt2, k_real,
                                   skb, skt, skh, skw, skn, skd, svb, svt, svh, svw, svn, svd, spk_h, spk_d, spv_h,
                                   spv_d, offs_d, d, N, HAS_PAD)
                    if COSINE:
                        kn, k_clamped, k_norm = _normalize(kb)
                        kb = kn.to(DT)
                    s, raw = _logits(qb, kb, tau, scale, mask_value, h, i, j, ci0, ci1, ci2, lab_i, cj0, cj1, cj2,
                                     lab_j, table_ptr, stab_r, stab_h, bias_ptr, sbias_h, sbias_i, sbias_j, DT,
                                     W0, W1, W2, BIAS, COSINE)
                    p = tl.exp(s - lse[:, None])
                    dp = _mm(do, tl.trans(vb), DT)
                    ds = p * (dp - delta[:, None])
                    dq_acc += _mm(ds, kb, DT)
                if COSINE:
                    dq = _unnormalize_grad(dq_acc * tau, qf, q_clamped, q_norm)
                else:
                    dq = dq_acc * scale
                dq_offs = _token_offsets(b, qt0, qt1, qt2, h, sob, sot, soh, sow, son)
                tl.store(dq_ptr + dq_offs[:, None] + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
                         mask=q_real[:, None] & dmask[None, :])
    if NEED_DLS:
        tl.store(dls_ptr + pid, tl.sum(dls_acc, axis=0) * tau * ls_open.to(tl.float32))
    if NEED_DPAD_K:
        tl.store(dpad_k_ptr + pid.to(tl.int64) * BLOCK_D + offs_d, dpk_acc)
    if NEED_DPAD_V:
        tl.store(dpad_v_ptr + pid.to(tl.int64) * BLOCK_D + offs_d, dpv_acc)


@triton.jit
def _bias_table_grad_kernel(dbias_ptr, dtable_ptr, heads,
                            W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, BLOCK: tl.constexpr):
    # The table gradient from the dense [heads, N, N] one: every (i, j) adds into its table row. N * N * heads
    # additions in all, against the main kernel's B * nW times as many.
    N: tl.constexpr = W0 * W1 * W2
    h = tl.program_id(1)
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    i = e // N
    j = e % N
    inside = e < N * N
    idx = (((i // (W1 * W2)) - (j // (W1 * W2)) + (W0 - 1)) * ((2 * W1 - 1) * (2 * W2 - 1))
           + (((i // W2) % W1) - ((j // W2) % W1) + (W1 - 1)) * (2 * W2 - 1)
           + ((i % W2) - (j % W2) + (W2 - 1)))
    g = tl.load(dbias_ptr + h * (N * N) + e, mask=inside, other=0.0)
    tl.atomic_add(dtable_ptr + idx * heads + h, g, mask=inside)


# ----------------------------------------------------------------------------------------------------------------
# Launchers


def _as3d(t: torch.Tensor) -> torch.Tensor:
    """(B, H, W, heads, d) -> (B, 1, H, W, heads, d), a view; 3D tensors unchanged."""
    return t.unsqueeze(1) if t.dim() == 5 else t


def _geometry(q, window, shift):
    if len(window) == 2:
        return (1, *q.shape[1:3]), (1, *window), (0, *shift)
    return tuple(q.shape[1:4]), tuple(window), tuple(shift)


def block_sizes(N: int, d: int, dtype: torch.dtype, backward: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps).

    tl.dot wants every block dim >= 16. A window of up to 64 tokens (Swin's 7x7 = 49) is one tile each way. Larger
    windows (Video Swin's 8x7x7 = 392) stream 64-key blocks past 64-query blocks (7 of each for 392, 12% padding
    against 23% for 128); fp32 tiles go through an ieee dot whose operands are staged in shared memory, so fp32
    keeps 32-wide key blocks (see AOT_SPECS for the measured shared memory).
    """
    np2 = triton.next_power_of_2
    block_d = max(16, np2(d))
    # 8 warps where 4 spilled at d = 32 (ptxas -v via pyvl.kernels.aot): the fp32 forward (255 registers + 2 KB
    # of spills at 4 warps), the streamed forward of windows over 64 tokens (3 KB) and every backward, which keeps
    # four [BLOCK_M, BLOCK_N] fp32 tiles (s, p, dp, ds) and the bias gather's 64-bit pointers alive at once.
    warps = 8 if backward or dtype == torch.float32 or N > 64 else 4
    if N <= 64:
        block = max(16, np2(N))
        return block, block, block_d, warps
    wide = 32 if dtype == torch.float32 else 64
    return 64, wide, block_d, warps


def _strides6(t):
    return tuple(int(s) for s in _as3d(t).stride())


def _common_args(q, k, v, window, shift, table, bias, logit_scale, pad_k, pad_v):
    sizes, win, sh = _geometry(q, window, shift)
    heads, d = int(q.shape[-2]), int(q.shape[-1])
    dummy = q
    tab_s = tuple(int(s) for s in table.stride()) if table is not None else (0, 0)
    bias_s = tuple(int(s) for s in bias.stride()) if bias is not None else (0, 0, 0)
    pk_s = tuple(int(s) for s in pad_k.stride()) if pad_k is not None else (0, 0)
    pv_s = tuple(int(s) for s in pad_v.stride()) if pad_v is not None else (0, 0)
    pointers = (table if table is not None else dummy, bias if bias is not None else dummy,
                logit_scale if logit_scale is not None else dummy, pad_k if pad_k is not None else dummy,
                pad_v if pad_v is not None else dummy)
    n_windows = math.prod(-(-s // w) for s, w in zip(sizes, win))
    scalars = (*sizes, *sh, heads, d, *_strides6(q), *_strides6(k), *_strides6(v))
    rest = (*tab_s, *bias_s, int(logit_scale.stride(0)) if logit_scale is not None else 0, *pk_s, *pv_s)
    flags = dict(W0=win[0], W1=win[1], W2=win[2],
                 BIAS=BIAS_TABLE if table is not None else BIAS_DENSE if bias is not None else BIAS_NONE,
                 COSINE=logit_scale is not None, HAS_PAD=pad_k is not None)
    return pointers, scalars, rest, flags, n_windows, math.prod(win), heads, d


def window_attention_forward(q, k, v, window, shift, table, bias, logit_scale, scale, pad_k, pad_v, pad_first,
                             mask_value):
    """(out, lse) of pyvl.ops.window_attention's kernel schema; pad_k and pad_v both given or both None."""
    if (pad_k is None) != (pad_v is None):
        pad_k = pad_k if pad_k is not None else torch.zeros_like(pad_v)
        pad_v = pad_v if pad_v is not None else torch.zeros_like(pad_k)
    pointers, scalars, rest, flags, n_windows, N, heads, d = _common_args(q, k, v, window, shift, table, bias,
                                                                          logit_scale, pad_k, pad_v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    block_m, block_n, block_d, num_warps = block_sizes(N, d, q.dtype)
    B = int(q.shape[0])
    grid = (B * n_windows * heads * triton.cdiv(N, block_m),)
    _window_attention_fwd_kernel[grid](
        q, k, v, out, lse, *pointers, *scalars, *_strides6(out)[:5], *_strides6(lse.unsqueeze(-1))[:5], *rest,
        float(scale) if scale is not None else 1.0, float(mask_value),
        PAD_FIRST=bool(pad_first), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
        **flags)
    return out, lse


def window_attention_backward(grad_out, q, k, v, out, lse, window, shift, table, bias, logit_scale, scale, pad_k,
                              pad_v, pad_first, mask_value, needs):
    """The 8 gradients (dq, dk, dv, d_table, d_bias, d_logit_scale, d_pad_k, d_pad_v) of the kernel schema; an
    empty [0] tensor for each one not needed or whose input is None."""
    need_q, need_k, need_v, need_table, need_bias, need_ls, need_pk, need_pv = (bool(n) for n in needs)
    need_table &= table is not None
    need_bias &= bias is not None
    need_ls &= logit_scale is not None
    need_pk &= pad_k is not None
    need_pv &= pad_v is not None
    if (pad_k is None) != (pad_v is None):
        pad_k = pad_k if pad_k is not None else torch.zeros_like(pad_v)
        pad_v = pad_v if pad_v is not None else torch.zeros_like(pad_k)
    pointers, scalars, rest, flags, n_windows, N, heads, d = _common_args(q, k, v, window, shift, table, bias,
                                                                          logit_scale, pad_k, pad_v)
    # out and grad_out share one (contiguous) layout in the kernel, as do dq, dk, dv: the token layout
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    B = int(q.shape[0])
    programs = B * n_windows * heads
    block_m, block_n, block_d, num_warps = block_sizes(N, d, q.dtype, backward=True)
    dev = q.device

    def empty():  # a distinct [0] tensor per gradient not computed (custom ops' outputs must not alias)
        return q.new_empty((0,))

    dq = torch.empty(q.shape, dtype=q.dtype, device=dev) if need_q else empty()
    dk = torch.empty(q.shape, dtype=q.dtype, device=dev) if need_k else empty()
    dv = torch.empty(q.shape, dtype=q.dtype, device=dev) if need_v else empty()
    dbias = torch.zeros((heads, N, N), dtype=torch.float32, device=dev) if need_table or need_bias else empty()
    dls = torch.empty(programs, dtype=torch.float32, device=dev) if need_ls else empty()
    dpk = torch.empty((programs, block_d), dtype=torch.float32, device=dev) if need_pk else empty()
    dpv = torch.empty((programs, block_d), dtype=torch.float32, device=dev) if need_pv else empty()
    # Real tensors stand in for the outputs not computed: the kernel never touches them.
    _window_attention_bwd_kernel[(programs,)](
        q, k, v, out, grad_out, lse, *pointers,
        dq if need_q else q, dk if need_k else q, dv if need_v else q, dbias if dbias.numel() else lse,
        dls if need_ls else lse, dpk if need_pk else lse, dpv if need_pv else lse,
        *scalars, *_strides6(out)[:5], *_strides6(lse.unsqueeze(-1))[:5], *rest,
        float(scale) if scale is not None else 1.0, float(mask_value),
        PAD_FIRST=bool(pad_first), NEED_DQ=need_q, NEED_DK=need_k, NEED_DV=need_v,
        NEED_DBIAS=need_table or need_bias, NEED_DLS=need_ls, NEED_DPAD_K=need_pk, NEED_DPAD_V=need_pv,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, **flags)
    d_table, d_bias = empty(), empty()
    if need_table:
        d_table32 = torch.zeros(table.shape, dtype=torch.float32, device=dev)
        block = min(1024, triton.next_power_of_2(N * N))
        _bias_table_grad_kernel[(triton.cdiv(N * N, block), heads)](
            dbias, d_table32, heads, W0=flags["W0"], W1=flags["W1"], W2=flags["W2"], BLOCK=block)
        d_table = d_table32.to(table.dtype)
    if need_bias:
        d_bias = dbias.to(bias.dtype)
    d_ls = dls.view(-1, heads).sum(0).to(logit_scale.dtype) if need_ls else empty()
    d_pad_k = dpk.view(-1, heads, block_d).sum(0)[:, :d].to(pad_k.dtype).contiguous() if need_pk else empty()
    d_pad_v = dpv.view(-1, heads, block_d).sum(0)[:, :d].to(pad_v.dtype).contiguous() if need_pv else empty()
    return dq, dk, dv, d_table, d_bias, d_ls, d_pad_k, d_pad_v


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs for pyvl.kernels.aot: Swin's 2D 7x7 window (N = 49, one 64-token tile) and Video
# Swin's 8x7x7 window (N = 392, streamed in blocks), d = 32 (every Swin / Video Swin stage), plain and cosine,
# table and dense bias, at the block sizes block_sizes() picks. Shift, padding and pad_kv are on: the most code.

_FP32_ONLY = {"lse_ptr": "*fp32"}
_BWD_FP32 = {"lse_ptr": "*fp32", "dbias_ptr": "*fp32", "dls_ptr": "*fp32", "dpad_k_ptr": "*fp32",
             "dpad_v_ptr": "*fp32"}
_FLOATS = {"scale": "fp32", "mask_value": "fp32"}
_NEEDS = dict(NEED_DQ=True, NEED_DK=True, NEED_DV=True, NEED_DBIAS=True, NEED_DPAD_K=True, NEED_DPAD_V=True)


def _aot_specs():
    specs = []
    for window in ((1, 7, 7), (8, 7, 7)):
        N = math.prod(window)
        for dtypes, torch_dtype in ((("fp16", "bf16"), torch.float16), (("fp32",), torch.float32)):
            for cosine, bias in ((False, BIAS_TABLE), (True, BIAS_DENSE), (True, BIAS_TABLE)):
                flags = dict(W0=window[0], W1=window[1], W2=window[2], PAD_FIRST=True, BIAS=bias, COSINE=cosine,
                             HAS_PAD=True)
                bm, bn, bd, warps = block_sizes(N, 32, torch_dtype)
                blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
                tag = f"N{N}{' cos' if cosine else ''} {'table' if bias == BIAS_TABLE else 'dense'}"
                specs.append(dict(kernel=_window_attention_fwd_kernel, dtypes=dtypes, num_warps=warps,
                                  label=f"wa_fwd {tag} {bm}x{bn}",
                                  pointers={**_FP32_ONLY, **_FLOATS}, constexprs={**flags, **blocks}))
                bm, bn, bd, warps = block_sizes(N, 32, torch_dtype, backward=True)
                specs.append(dict(kernel=_window_attention_bwd_kernel, dtypes=dtypes, num_warps=warps,
                                  label=f"wa_bwd {tag} {bm}x{bn}",
                                  pointers={**_BWD_FP32, **_FLOATS},
                                  constexprs={**flags, **_NEEDS, "NEED_DLS": cosine, "BLOCK_M": bm, "BLOCK_N": bn,
                                              "BLOCK_D": bd}))
        specs.append(dict(kernel=_bias_table_grad_kernel, dtypes=("fp32",), num_warps=4, label=f"wa_table_grad N{N}",
                          constexprs=dict(W0=window[0], W1=window[1], W2=window[2],
                                          BLOCK=min(1024, triton.next_power_of_2(N * N)))))
    return specs


AOT_SPECS = _aot_specs()
