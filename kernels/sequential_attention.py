"""Triton kernels for sequential attention: softmax(q k^T * scale + bias) v by blocks with an online softmax
(FlashAttention-2's schedule), forward and backward with the bias gradient.

  _attn_fwd_kernel     one program per (query block, head): out and the per-row log-sum-exp
  _attn_bwd_dkdv_kernel one program per (key block, head): dK and dV, looping over the query blocks
  _attn_bwd_dq_kernel  one program per (query block, bias group): dQ and the bias gradient

Every tensor is addressed through its strides (q, k, v of any layout; the bias with stride 0 along the dims it is
broadcast over), so nothing is copied or expanded. Offsets are int64.

The bias gradient of a bias broadcast over batch or heads sums over those dims. Default: each (query block, head)
program adds its tile with tl.atomic_add (all heads in flight at once; the order of the adds, hence the last bits,
varies run to run). deterministic=True: one program per (query block, bias group) owns its tile and loops over
the group's heads in (b, h) order, adding with plain loads and stores. A bias not broadcast over batch or heads
has one head per group either way and never needs atomics.

The launchers only allocate outputs, pick block sizes and launch; argument checks live in pyvl.ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, DT: tl.constexpr):
    # fp32 / fp64: ieee (on the GPU tl.dot defaults to tf32, which would not match the fp32 reference)
    if DT == tl.float32 or DT == tl.float64:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _scores(q, k_ptrs, bias_ptrs, mask_m, mask_n, mask_d, scale, HAS_BIAS: tl.constexpr, DT: tl.constexpr,
            ACC: tl.constexpr):
    """scale * q k^T + bias for one [BLOCK_M, BLOCK_N] tile, -inf outside the keys; k_ptrs address k^T."""
    k = tl.load(k_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
    s = _dot(q, k, DT).to(ACC) * scale
    if HAS_BIAS:
        s += tl.load(bias_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(ACC)
    return tl.where(mask_n[None, :], s, float("-inf"))


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, lse_ptr, scale,
                     H, N, M, D, DV,
                     sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd,
                     sbb, sbh, sbn, sbm, sob, soh, son, sod,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr):
    DT: tl.constexpr = q_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < N
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    m64 = offs_m.to(tl.int64)
    q = tl.load(q_ptr + b * sqb + h * sqh + m64[:, None] * sqn + offs_d[None, :] * sqd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    l_i = tl.zeros((BLOCK_M,), dtype=ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=ACC)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < M
        n64 = offs_n.to(tl.int64)
        s = _scores(q, k_ptr + b * skb + h * skh + n64[None, :] * skm + offs_d[:, None] * skd,
                    bias_ptr + b * sbb + h * sbh + m64[:, None] * sbn + n64[None, :] * sbm,
                    mask_m, mask_n, mask_d, scale, HAS_BIAS, DT, ACC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no finite score yet keeps m = -inf; subtracting 0 instead keeps exp(-inf - m) at 0 rather
        # than NaN, so that a fully masked key block does not poison the row.
        base = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - base[:, None])
        alpha = tl.exp(m_i - base)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + b * svb + h * svh + n64[:, None] * svm + offs_dv[None, :] * svd,
                    mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(DT), v, DT).to(ACC)
        m_i = m_new
    # l = 0 only when every score is -inf: 0 / 0 = NaN, the NaN policy.
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * sob + h * soh + m64[:, None] * son + offs_dv[None, :] * sod,
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_dv[None, :])
    tl.store(lse_ptr + bh * N + m64, (m_i + tl.log(l_i)).to(lse_ptr.dtype.element_ty), mask=mask_m)


@triton.jit
def _query_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, bh, N, m64, mask_m, offs_d, mask_d, offs_dv, mask_dv,
                sqb, sqh, sqn, sqd, sdob, sdoh, sdon, sdod):
    """The backward's per-query-block operands: q [BLOCK_M, BLOCK_D], dO [BLOCK_M, BLOCK_DV], lse and delta."""
    q = tl.load(q_ptr + b * sqb + h * sqh + m64[:, None] * sqn + offs_d[None, :] * sqd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    do = tl.load(do_ptr + b * sdob + h * sdoh + m64[:, None] * sdon + offs_dv[None, :] * sdod,
                 mask=mask_m[:, None] & mask_dv[None, :], other=0.0)
    lse = tl.load(lse_ptr + bh * N + m64, mask=mask_m, other=0.0)
    delta = tl.load(delta_ptr + bh * N + m64, mask=mask_m, other=0.0)
    return q, do, lse, delta


@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, scale,
                          H, N, M, D, DV,
                          sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd,
                          sbb, sbh, sbn, sbm, sdob, sdoh, sdon, sdod,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr):
    # dV = P^T dO and dK = scale * dS^T Q for one key block, summed over the query blocks in order: each program
    # owns its dK and dV rows. dk and dv are dense [B, H, M, D] / [B, H, M, DV].
    DT: tl.constexpr = q_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_n = offs_n < M
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    n64 = offs_n.to(tl.int64)
    kt_ptrs = k_ptr + b * skb + h * skh + n64[None, :] * skm + offs_d[:, None] * skd
    # v^T [BLOCK_DV, BLOCK_N] for dP = dO v^T
    vt = tl.load(v_ptr + b * svb + h * svh + n64[None, :] * svm + offs_dv[:, None] * svd,
                 mask=mask_dv[:, None] & mask_n[None, :], other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=ACC)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        m64 = offs_m.to(tl.int64)
        q, do, lse, delta = _query_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, bh, N, m64, mask_m, offs_d, mask_d,
                                        offs_dv, mask_dv, sqb, sqh, sqn, sqd, sdob, sdoh, sdon, sdod)
        s = _scores(q, kt_ptrs, bias_ptr + b * sbb + h * sbh + m64[:, None] * sbn + n64[None, :] * sbm,
                    mask_m, mask_n, mask_d, scale, HAS_BIAS, DT, ACC)
        p = tl.where(mask_m[:, None] & mask_n[None, :], tl.exp(s - lse[:, None]), 0.0)
        dv += _dot(tl.trans(p.to(DT)), do, DT).to(ACC)
        dp = _dot(do, vt, DT).to(ACC)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(DT)), q, DT).to(ACC)
    base_k = bh * M * D + n64[:, None] * D
    tl.store(dk_ptr + base_k + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty),
             mask=mask_n[:, None] & mask_d[None, :])
    tl.store(dv_ptr + bh * M * DV + n64[:, None] * DV + offs_dv[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=mask_n[:, None] & mask_dv[None, :])


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dbias_ptr, scale,
                        H, N, M, D, DV, GH, NB_MAP, NH_MAP,
                        sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd,
                        sbb, sbh, sbn, sbm, sdob, sdoh, sdon, sdod, sgb, sgh,
                        HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, ATOMIC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, ACC: tl.constexpr):
    # One program per (query block, group of heads). A group is the NB_MAP x NH_MAP heads that share one bias
    # slice (deterministic bias gradient) or a single head. The program owns the dQ rows of its heads and, unless
    # ATOMIC, the bias-gradient tile of its group, which it sums over the group's heads in (b, h) order.
    # dbias is a dense float32 (float64 for float64 inputs) [1 or B, 1 or H, N, M], zeroed, with strides sgb / sgh
    # (0 along broadcast dims).
    DT: tl.constexpr = q_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    gb = (g // GH).to(tl.int64)
    gh = (g % GH).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < N
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    m64 = offs_m.to(tl.int64)
    for idx in range(0, NB_MAP * NH_MAP):
        b = gb + idx // NH_MAP
        h = gh + idx % NH_MAP
        bh = b * H + h
        q, do, lse, delta = _query_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, bh, N, m64, mask_m, offs_d, mask_d,
                                        offs_dv, mask_dv, sqb, sqh, sqn, sqd, sdob, sdoh, sdon, sdod)
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
        for start_n in range(0, M, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < M
            n64 = offs_n.to(tl.int64)
            s = _scores(q, k_ptr + b * skb + h * skh + n64[None, :] * skm + offs_d[:, None] * skd,
                        bias_ptr + b * sbb + h * sbh + m64[:, None] * sbn + n64[None, :] * sbm,
                        mask_m, mask_n, mask_d, scale, HAS_BIAS, DT, ACC)
            tile = mask_m[:, None] & mask_n[None, :]
            p = tl.where(tile, tl.exp(s - lse[:, None]), 0.0)
            vt = tl.load(v_ptr + b * svb + h * svh + n64[None, :] * svm + offs_dv[:, None] * svd,
                         mask=mask_dv[:, None] & mask_n[None, :], other=0.0)
            ds = p * (_dot(do, vt, DT).to(ACC) - delta[:, None])
            k = tl.load(k_ptr + b * skb + h * skh + n64[:, None] * skm + offs_d[None, :] * skd,
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            dq += _dot(ds.to(DT), k, DT).to(ACC)
            if BIAS_GRAD:
                g_ptrs = dbias_ptr + b * sgb + h * sgh + m64[:, None] * M + n64[None, :]
                if ATOMIC:
                    tl.atomic_add(g_ptrs, ds.to(dbias_ptr.dtype.element_ty), mask=tile)
                else:
                    prev = tl.load(g_ptrs, mask=tile, other=0.0)
                    tl.store(g_ptrs, prev + ds.to(dbias_ptr.dtype.element_ty), mask=tile)
        tl.store(dq_ptr + bh * N * D + m64[:, None] * D + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers


def _acc_dtype(t):
    # float64 keeps float64 math (gradcheck in float64); everything narrower accumulates in float32
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _blocks(N, M, D, DV, dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV). tl.dot wants every dim >= 16; head dims pad to a power of two.

    From ptxas -v (pyvl.kernels.aot): fp32 dots run in ieee precision on FMAs and at 64 x 64 tiles spilled tens of
    KB per thread and staged up to 145 KB of shared memory, so fp32 / fp64 take 32 x 32 tiles; fp16 / bf16 take
    64 query rows, and 32 keys once a head dim exceeds 32 (64 x 64 at d = 64 reached 255 registers and spilled)."""
    np2 = triton.next_power_of_2
    wide = dtype in (torch.float16, torch.bfloat16)
    cap_m = 64 if wide else 32
    cap_n = 64 if wide and max(D, DV) <= 32 else 32
    return (max(16, min(cap_m, np2(N))), max(16, min(cap_n, np2(M))), max(16, np2(D)), max(16, np2(DV)))


def _bias_strides(bias, shape):
    """Strides of the bias broadcast to [B, H, N, M]: 0 along broadcast dims (and for no bias)."""
    if bias is None:
        return (0, 0, 0, 0)
    return tuple(0 if bias.shape[i] == 1 else int(bias.stride(i)) for i in range(4))


def _strides(t):
    return tuple(int(s) for s in t.stride())


def sequential_attention_forward(q, k, v, bias, scale):
    B, H, N, D = q.shape
    M, DV = k.shape[2], v.shape[3]
    out = torch.empty((B, H, N, DV), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                      device=q.device)
    bm, bn, bd, bdv = _blocks(N, M, D, DV, q.dtype)
    _attn_fwd_kernel[(triton.cdiv(N, bm), B * H)](
        q, k, v, bias if bias is not None else q, out, lse, float(scale), H, N, M, D, DV,
        *_strides(q), *_strides(k), *_strides(v), *_bias_strides(bias, (B, H, N, M)), *_strides(out),
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv, ACC=_acc_dtype(q),
        num_warps=4)
    return out, lse


def sequential_attention_backward(grad_out, q, k, v, bias, out, lse, scale, bias_requires_grad, deterministic):
    B, H, N, D = q.shape
    M, DV = k.shape[2], v.shape[3]
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij: the softmax backward's per-row term, O(N) floats.
    delta = (grad_out.to(acc_dtype) * out.to(acc_dtype)).sum(-1).contiguous()
    lse = lse.to(acc_dtype).contiguous()
    dq = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, M, D), dtype=q.dtype, device=q.device)
    dv = torch.empty((B, H, M, DV), dtype=q.dtype, device=q.device)
    bm, bn, bd, bdv = _blocks(N, M, D, DV, q.dtype)
    bias_arg = bias if bias is not None else q
    common = (*_strides(q), *_strides(k), *_strides(v), *_bias_strides(bias, (B, H, N, M)), *_strides(grad_out))
    flags = dict(HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv, ACC=_acc_dtype(q),
                 num_warps=4)
    _attn_bwd_dkdv_kernel[(triton.cdiv(M, bn), B * H)](
        q, k, v, bias_arg, grad_out, lse, delta, dk, dv, float(scale), H, N, M, D, DV, *common, **flags)

    want_bias = bias is not None and bias_requires_grad
    bias_B, bias_H = (int(bias.shape[0]), int(bias.shape[1])) if want_bias else (B, H)
    # A program per head unless the deterministic bias gradient must sum a group of heads in one program.
    nb_map = B if (want_bias and deterministic and bias_B == 1) else 1
    nh_map = H if (want_bias and deterministic and bias_H == 1) else 1
    atomic = want_bias and not deterministic and (bias_B < B or bias_H < H)
    gacc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dbias = torch.zeros((bias_B, bias_H, N, M), dtype=gacc, device=q.device) if want_bias else q.new_empty((0,))
    sgb = int(dbias.stride(0)) if want_bias and bias_B > 1 else 0
    sgh = int(dbias.stride(1)) if want_bias and bias_H > 1 else 0
    groups = (B // nb_map) * (H // nh_map)
    _attn_bwd_dq_kernel[(triton.cdiv(N, bm), groups)](
        q, k, v, bias_arg, grad_out, lse, delta, dq, dbias if want_bias else q, float(scale),
        H, N, M, D, DV, H // nh_map, nb_map, nh_map, *common, sgb, sgh,
        BIAS_GRAD=want_bias, ATOMIC=atomic, **flags)
    if want_bias:
        if bias.shape[2] == 1 and N > 1:
            dbias = dbias.sum(2, keepdim=True)
        if bias.shape[3] == 1 and M > 1:
            dbias = dbias.sum(3, keepdim=True)
        dbias = dbias.to(bias.dtype)
    return dq, dk, dv, dbias


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs for pyvl.kernels.aot: the largest tiles the launchers pick (_blocks) at head dims 32
# and 64, in every dtype launched on a GPU.

_F32 = {"lse_ptr": "*fp32", "delta_ptr": "*fp32", "scale": "fp32"}


def _specs(kernel, extra=None, pointers=None):
    specs = []
    for d in (32, 64):
        for dtypes, bm, bn in ((("fp16", "bf16"), 64, 64 if d <= 32 else 32), (("fp32",), 32, 32)):
            specs.append(dict(kernel=kernel, dtypes=dtypes, num_warps=4, pointers=dict(_F32, **(pointers or {})),
                              constexprs=dict(HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d, BLOCK_DV=d,
                                              ACC=tl.float32, **(extra or {}))))
    return specs


AOT_SPECS = (_specs(_attn_fwd_kernel) + _specs(_attn_bwd_dkdv_kernel)
             + _specs(_attn_bwd_dq_kernel, dict(BIAS_GRAD=True, ATOMIC=False), {"dbias_ptr": "*fp32"})
             + _specs(_attn_bwd_dq_kernel, dict(BIAS_GRAD=True, ATOMIC=True), {"dbias_ptr": "*fp32"}))
