"""Triton kernels for the contrastive family: the similarity logits and the contrastive statistics (CLIP's
softmax / SigLIP's sigmoid loss) tile by tile, without an N x M matrix in memory.

  _similarity_kernel   one program per (row block, column block, batch): scale * a b^T / (|a| |b|) + bias, the row
                       norms summed in the same loop over d as the dot products (no normalized copies)
  _stats_fwd_kernel    a persistent grid (two programs per SM), each taking every P-th row block of x and looping
                       over every column block of y: the rows' running log-sum-exp (softmax) or sum of softplus
                       (sigmoid), the matched pairs' logits, and, for softmax, the columns' partial (max, sum of exp)
                       over the program's rows, merged into the program's own row of a [programs, M] buffer and
                       combined after the launch (no atomics, deterministic; O(SMs x M) memory)
  _stats_bwd_kernel    one program per (row block, d chunk) of the side whose gradient it computes, looping over every
                       block of the other side: recomputes the logits tile, forms G = d(stats)/d(logits) and adds
                       G @ other; launched twice (grad_x from x's rows, grad_y from y's rows, the same kernel with the
                       roles swapped), so every output element has one owner and no atomics are needed. The
                       logit_scale / logit_bias gradients are per-row partials summed after the launch.

The statistics' contract is torch.ops.pyvl.contrastive_stats' (pyvl/reference/contrastive.py contrastive_stats):
with L = logit_scale * x @ y^T + logit_bias, softmax gives (logsumexp_j L_ij, logsumexp_i L_ij, L_i,i+offset),
sigmoid gives (sum_j softplus(L_ij), [], L_i,i+offset). Its backward takes any cotangents of the three outputs.

Precision: the products run on tl.dot with float32 accumulation; float16 / bfloat16 operands go to the tensor cores
as they are, float32 operands in IEEE precision (input_precision="ieee": TF32 would not meet the fp32 error
criterion; the kernels take no TF32 switch). Every statistic, exp and log is in float32. float64 is not launched here
(pyvl.ops refuses it for the triton backend; the cpu and reference backends run it). In the backward, the
low-precision copy of G that feeds the second product is multiplied by a power of two that puts its largest
possible entry near 1 (computed on the device from the cotangents), so that float16 does not flush the ~1/N
probabilities of a large batch to zero; the factor is divided out of the float32 result.

Cost: the forward is one N x M x d product; the backward recomputes the logits in each of its two launches and, when
d is larger than the d chunk (BLOCK_DO), once per chunk: (2 + 2 * ceil(d / BLOCK_DO)) products of N x M x d against
the 3 of a backward that stored the logits: 4 for d <= 256, 6 at d = 512 and 8 at d = 768 in float16 / bfloat16
(BLOCK_DO = 256). A backward writing G in chunks of columns for two cuBLAS GEMMs would do 3; not done yet.

Offsets are int64 (program ids and indices are cast before they meet a stride). The launchers only allocate
outputs, pick block sizes and launch; argument checks and backend choice live in pyvl.ops.contrastive.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

EPS = tl.constexpr(1e-12)  # F.normalize's default, as the reference uses


@triton.jit
def _dot(a, b, DT: tl.constexpr):
    if DT == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _raw_tile(a_ptr, b_ptr, offs_a, offs_b, mask_a, mask_b, D, sam, sad, sbm, sbd,
              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, DT: tl.constexpr):
    """a[offs_a] @ b[offs_b]^T in float32, [BLOCK_A, BLOCK_B], d streamed in chunks of BLOCK_K."""
    a64 = offs_a.to(tl.int64)
    b64 = offs_b.to(tl.int64)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        k64 = offs_k.to(tl.int64)
        a = tl.load(a_ptr + a64[:, None] * sam + k64[None, :] * sad, mask=mask_a[:, None] & mask_k[None, :], other=0.0)
        bt = tl.load(b_ptr + k64[:, None] * sbd + b64[None, :] * sbm, mask=mask_k[:, None] & mask_b[None, :],
                     other=0.0)
        acc += _dot(a, bt, DT)
    return acc


@triton.jit
def _softplus(z):
    # max(z, 0) + log1p(exp(-|z|)), log1p by Goldberg's u = 1 + e; log(u) * e / (u - 1): exact to a few ulp where
    # log(1 + e) in float32 would round e below 6e-8 away (SigLIP's bias of -10 makes most logits that small).
    e = tl.exp(-tl.abs(z))
    u = 1.0 + e
    exact = u == 1.0
    log1p = tl.where(exact, e, tl.log(u) * e / tl.where(exact, 1.0, u - 1.0))
    return tl.maximum(z, 0.0) + log1p


# ----------------------------------------------------------------------------------------------------------------
# Similarity logits


@triton.jit
def _similarity_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, out_ptr, N, M, D,
                       sab, san, sad, sbb, sbm, sbd,
                       NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # out is a dense [B, N, M] of a's dtype; a and b are addressed through their strides (batch stride 0 when
    # broadcast), so no expanded or normalized copies exist.
    DT: tl.constexpr = a_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bi = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < N
    mask_n = offs_n < M
    m64 = offs_m.to(tl.int64)
    n64 = offs_n.to(tl.int64)
    a_base = a_ptr + bi * sab
    b_base = b_ptr + bi * sbb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ssa = tl.zeros((BLOCK_M,), dtype=tl.float32)
    ssb = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        k64 = offs_k.to(tl.int64)
        a = tl.load(a_base + m64[:, None] * san + k64[None, :] * sad, mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        bt = tl.load(b_base + k64[:, None] * sbd + n64[None, :] * sbm, mask=mask_k[:, None] & mask_n[None, :],
                     other=0.0)
        acc += _dot(a, bt, DT)
        if NORMALIZE:
            af = a.to(tl.float32)
            bf = bt.to(tl.float32)
            ssa += tl.sum(af * af, 1)
            ssb += tl.sum(bf * bf, 0)
    scale = tl.load(scale_ptr).to(tl.float32)
    if NORMALIZE:
        inv_a = 1.0 / tl.maximum(tl.sqrt(ssa), EPS)
        inv_b = 1.0 / tl.maximum(tl.sqrt(ssb), EPS)
        out = acc * (inv_a * scale)[:, None] * inv_b[None, :]
    else:
        out = acc * scale
    if HAS_BIAS:
        out += tl.load(bias_ptr).to(tl.float32)
    tl.store(out_ptr + bi * N * M + m64[:, None] * M + n64[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Contrastive statistics, forward


@triton.jit
def _stats_fwd_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, row_ptr, diag_ptr, cmax_ptr, csum_ptr,
                      N, M, D, diag_offset, sxm, sxd, sym, syd,
                      SOFTMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # A persistent grid of P programs: program p takes row blocks p, p + P, p + 2P, ... row, diag: float32 [N];
    # cmax, csum: float32 [P, M] (softmax only), column j's max over program p's rows and the sum of exp(L - that
    # max), which the program merges into its own buffer row after its first row block (no other program writes
    # there), so the buffer is O(P M) whatever N is.
    DT: tl.constexpr = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    part = pid.to(tl.int64) * M
    for m0 in range(pid * BLOCK_M, N, P * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        first = m0 == pid * BLOCK_M
        r_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        r_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        diag = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, M, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < M
            tile = mask_m[:, None] & mask_n[None, :]
            L = _raw_tile(x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D, sxm, sxd, sym, syd,
                          BLOCK_M, BLOCK_N, BLOCK_K, DT) * scale + bias
            on_diag = tile & (offs_n[None, :] == offs_m[:, None] + diag_offset)
            diag += tl.sum(tl.where(on_diag, L, 0.0), 1)
            if SOFTMAX:
                L = tl.where(tile, L, float("-inf"))
                new_max = tl.maximum(r_max, tl.max(L, 1))
                # rows past N keep max -inf: subtract 0 there so that exp gives 0, not NaN
                base = tl.where(new_max == float("-inf"), 0.0, new_max)
                r_sum = r_sum * tl.exp(r_max - base) + tl.sum(tl.exp(L - base[:, None]), 1)
                r_max = new_max
                c_max = tl.max(L, 0)  # finite in the columns < M (a row block holds at least one row)
                c_base = tl.where(mask_n, c_max, 0.0)  # -inf - -inf past M would be NaN (masked out, but noisy)
                c_sum = tl.sum(tl.exp(L - c_base[None, :]), 0)
                if not first:
                    p_max = tl.load(cmax_ptr + part + offs_n, mask=mask_n, other=0.0)
                    p_sum = tl.load(csum_ptr + part + offs_n, mask=mask_n, other=0.0)
                    both = tl.maximum(p_max, c_max)
                    c_sum = p_sum * tl.exp(p_max - both) + c_sum * tl.exp(c_max - both)
                    c_max = both
                tl.store(cmax_ptr + part + offs_n, c_max, mask=mask_n)
                tl.store(csum_ptr + part + offs_n, c_sum, mask=mask_n)
            else:
                r_sum += tl.sum(tl.where(tile, _softplus(L), 0.0), 1)
        if SOFTMAX:
            row = r_max + tl.log(tl.where(mask_m, r_sum, 1.0))
        else:
            row = r_sum
        tl.store(row_ptr + offs_m, row, mask=mask_m)
        tl.store(diag_ptr + offs_m, diag, mask=mask_m)


# ----------------------------------------------------------------------------------------------------------------
# Contrastive statistics, backward


@triton.jit
def _stats_bwd_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, gmul_ptr,
                      stat_a_ptr, gstat_a_ptr, stat_b_ptr, gstat_b_ptr, gdiag_ptr,
                      grad_ptr, gs_ptr, gb_ptr,
                      NA, NB, D, diag_offset, sam, sad, sbm, sbd,
                      SOFTMAX: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK_A: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
    # grad[a rows, d chunk] = scale * sum_b G[a, b] * b_feat[b, d chunk], G = d(stats) / d(L), over every block of b.
    # Not TRANSPOSED: a = x, b = y, L[a, b]; stat/gstat_a = row / grad_row, stat/gstat_b = col / grad_col; the
    # matched pair of x row i is y row i + diag_offset. TRANSPOSED: a = y, b = x, the same logits seen as L^T: the
    # launcher swaps the statistics and passes -diag_offset, and for sigmoid the cotangent that multiplies sigmoid(L)
    # is x's (the b side's). gs / gb: float32 [NA] per-row partials of the logit_scale and logit_bias gradients,
    # written by the not-TRANSPOSED launch's first d chunk. grad: dense [NA, D] of a's dtype.
    DT: tl.constexpr = a_ptr.dtype.element_ty
    pid_a = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = offs_a < NA
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mask_do = offs_do < D
    do64 = offs_do.to(tl.int64)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    gmul = tl.load(gmul_ptr).to(tl.float32)
    if SOFTMAX:
        ga = tl.load(gstat_a_ptr + offs_a, mask=mask_a, other=0.0)
        sa = tl.load(stat_a_ptr + offs_a, mask=mask_a, other=0.0)
    elif not TRANSPOSED:
        ga = tl.load(gstat_a_ptr + offs_a, mask=mask_a, other=0.0)
    if not TRANSPOSED:
        gd_a = tl.load(gdiag_ptr + offs_a, mask=mask_a, other=0.0)
    acc = tl.zeros((BLOCK_A, BLOCK_DO), dtype=tl.float32)
    gs = tl.zeros((BLOCK_A,), dtype=tl.float32)
    gbias = tl.zeros((BLOCK_A,), dtype=tl.float32)
    for b0 in range(0, NB, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < NB
        tile = mask_a[:, None] & mask_b[None, :]
        S = _raw_tile(a_ptr, b_ptr, offs_a, offs_b, mask_a, mask_b, D, sam, sad, sbm, sbd,
                      BLOCK_A, BLOCK_B, BLOCK_K, DT)
        L = S * scale + bias
        if SOFTMAX:
            gb_ = tl.load(gstat_b_ptr + offs_b, mask=mask_b, other=0.0)
            sb = tl.load(stat_b_ptr + offs_b, mask=mask_b, other=0.0)
            G = ga[:, None] * tl.exp(L - sa[:, None]) + gb_[None, :] * tl.exp(L - sb[None, :])
        else:
            sig = 1.0 / (1.0 + tl.exp(-L))
            if TRANSPOSED:
                gb_ = tl.load(gstat_b_ptr + offs_b, mask=mask_b, other=0.0)
                G = gb_[None, :] * sig
            else:
                G = ga[:, None] * sig
        on_diag = offs_b[None, :] == offs_a[:, None] + diag_offset
        if TRANSPOSED:
            gd_b = tl.load(gdiag_ptr + offs_b, mask=mask_b, other=0.0)
            G += tl.where(on_diag, gd_b[None, :], 0.0)
        else:
            G += tl.where(on_diag, gd_a[:, None], 0.0)
        G = tl.where(tile, G, 0.0)
        if not TRANSPOSED:
            gs += tl.sum(G * S, 1)
            gbias += tl.sum(G, 1)
        b64 = offs_b.to(tl.int64)
        feat = tl.load(b_ptr + b64[:, None] * sbm + do64[None, :] * sbd, mask=mask_b[:, None] & mask_do[None, :],
                       other=0.0)
        acc += _dot((G * gmul).to(DT), feat, DT)
    a64 = offs_a.to(tl.int64)
    tl.store(grad_ptr + a64[:, None] * D + do64[None, :], (acc * (scale / gmul)).to(grad_ptr.dtype.element_ty),
             mask=mask_a[:, None] & mask_do[None, :])
    if not TRANSPOSED:
        if pid_d == 0:
            tl.store(gs_ptr + offs_a, gs, mask=mask_a)
            tl.store(gb_ptr + offs_a, gbias, mask=mask_a)


# ----------------------------------------------------------------------------------------------------------------
# Launchers

_np2 = triton.next_power_of_2


# Largest (BLOCK_A, BLOCK_B, BLOCK_K, BLOCK_DO, forward num_warps, backward num_warps) per dtype class; AOT_SPECS
# compiles exactly these. From ptxas -v for sm_90 (pyvl.kernels.aot): float16 backward at BLOCK_DO = 512 spilled
# 1.2 KB per thread, at 256 it holds (255 registers, 12 B of spill in the transposed launch), so d = 512 takes two
# chunks; float32 at 4 warps spilled 36 B in the backward and at BLOCK_K = 32 also in the forward.
_TILES = {"wide": (128, 64, 64, 256, 8, 8), "fp32": (32, 32, 16, 64, 4, 8)}
_BWD_ROWS = 64  # the backward's accumulator is [BLOCK_A, BLOCK_DO] float32: 64 rows at most


def _blocks(dtype, rows, cols, D, backward=False):
    """(BLOCK_A, BLOCK_B, BLOCK_K, BLOCK_DO, num_warps) for `rows` x `cols` logits of d = D. tl.dot wants every
    dim >= 16. float16 / bfloat16: 128 x 64 tiles (64 x 64 in the backward), d streamed by 64; float32 in IEEE
    precision runs on FMAs with the operands in registers, so it takes 32 x 32 tiles and d by 16."""
    ca, cb, ck, cdo, warps, bwd_warps = _TILES["wide" if dtype in (torch.float16, torch.bfloat16) else "fp32"]
    if backward:
        ca, warps = min(ca, _BWD_ROWS), bwd_warps
    return (max(16, min(ca, _np2(rows))), max(16, min(cb, _np2(cols))), max(16, min(ck, _np2(D))),
            max(16, min(cdo, _np2(D))), warps)


def _persistent_programs(device) -> int:
    """Programs of the statistics' forward: two per SM (one 8-warp program of ~180 registers per thread fills half
    an SM's register file), which bounds the column partials at 2 x SMs x M floats twice (~2 MiB per 1000 columns
    on an H100) while every SM stays busy; 2 in the interpreter, so that its tests exercise the merge."""
    if device.type != "cuda":
        return 2
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _scalar(t, like):
    """A one-element float32 tensor on like's device (logit_scale / logit_bias), without a host sync."""
    if t is None:
        return torch.zeros(1, dtype=torch.float32, device=like.device)
    return t.detach().reshape(1).to(device=like.device, dtype=torch.float32)


def _strides(t):
    return tuple(int(s) for s in t.stride())


def similarity_logits(a, b, scale, bias, normalize):
    """a [B, N, d], b [B, M, d] (any strides, batch stride 0 allowed) -> [B, N, M] of a's dtype."""
    B, N, D = a.shape
    M = b.shape[1]
    out = torch.empty((B, N, M), dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    bm, bn, bk, _, warps = _blocks(a.dtype, N, M, D)
    sab, san, sad = _strides(a)
    sbb, sbm, sbd = _strides(b)
    _similarity_kernel[(triton.cdiv(N, bm), triton.cdiv(M, bn), B)](
        a, b, _scalar(scale, a), _scalar(bias, a), out, N, M, D,
        sab if B > 1 else 0, san, sad, sbb if B > 1 else 0, sbm, sbd,
        NORMALIZE=bool(normalize), HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return out


def contrastive_stats(x, y, logit_scale, logit_bias, kind, diag_offset):
    """(row [n], col [m] (softmax) or [0] (sigmoid), diag [n]), float32: see torch.ops.pyvl.contrastive_stats."""
    n, D = x.shape
    m = y.shape[0]
    softmax = kind == 0
    f32 = dict(dtype=torch.float32, device=x.device)
    row = torch.empty(n, **f32)
    diag = torch.empty(n, **f32)
    if n == 0 or m == 0:  # an empty block: log-sum-exps over nothing are -inf, sums 0, no matched pairs
        empty = torch.full((m if softmax else 0,), float("-inf"), **f32)
        return row.fill_(float("-inf") if softmax else 0.0), empty, diag.zero_()
    bm, bn, bk, _, warps = _blocks(x.dtype, n, m, D)
    programs = min(triton.cdiv(n, bm), _persistent_programs(x.device))
    parts = (programs, m) if softmax else (1,)
    cmax = torch.empty(parts, **f32)
    csum = torch.empty(parts, **f32)
    _stats_fwd_kernel[(programs,)](
        x, y, _scalar(logit_scale, x), _scalar(logit_bias, x), row, diag, cmax, csum,
        n, m, D, int(diag_offset), *_strides(x), *_strides(y),
        SOFTMAX=softmax, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    if not softmax:
        return row, torch.empty(0, **f32), diag
    # The columns' log-sum-exps from the programs' partials: O(programs x M), in a fixed order.
    top = cmax.max(0).values
    col = top + torch.log((csum * torch.exp(cmax - top)).sum(0))
    return row, col, diag


def _gmul(*cotangents):
    """2^floor(log2(1 / bound)) with bound >= every |G| (each statistic's d/dL is at most 1 per cotangent), as a
    float32 tensor on the device, 1 where the cotangents are all 0."""
    bound = sum(c.detach().abs().amax().float() if c.numel() else c.new_zeros((), dtype=torch.float32)
                for c in cotangents)
    return torch.where(bound > 0, torch.exp2(torch.floor(-torch.log2(bound))), torch.ones_like(bound)).reshape(1)


def contrastive_stats_backward(grad_row, grad_col, grad_diag, x, y, logit_scale, logit_bias, row, col, kind,
                               diag_offset):
    """(grad_x [n, d], grad_y [m, d], grad of logit_scale in its shape, grad of logit_bias or an empty [0])."""
    n, D = x.shape
    m = y.shape[0]
    softmax = kind == 0
    f32 = dict(dtype=torch.float32, device=x.device)
    grad_x = torch.zeros((n, D), dtype=x.dtype, device=x.device)
    grad_y = torch.zeros((m, D), dtype=y.dtype, device=y.device)
    gs = torch.zeros(max(n, 1), **f32)
    gb = torch.zeros(max(n, 1), **f32)
    if n > 0 and m > 0:  # d = 0 runs too: the logits are all logit_bias, whose gradient the programs still sum
        grad_row = grad_row.float().contiguous()
        grad_diag = grad_diag.float().contiguous()
        row = row.float().contiguous()
        if softmax:
            grad_col, col = grad_col.float().contiguous(), col.float().contiguous()
        else:  # unused by the sigmoid kernels except as x's cotangent in the transposed launch
            grad_col = col = grad_row
        scale_t, bias_t = _scalar(logit_scale, x), _scalar(logit_bias, x)
        gmul = _gmul(grad_row, grad_col, grad_diag) if softmax else _gmul(grad_row, grad_diag)
        common = dict(SOFTMAX=softmax)
        # grad_x: x's rows against every y block; also the scale / bias partials
        ba, bb, bk, bdo, warps = _blocks(x.dtype, n, m, D, backward=True)
        _stats_bwd_kernel[(triton.cdiv(n, ba), max(1, triton.cdiv(D, bdo)))](
            x, y, scale_t, bias_t, gmul, row, grad_row, col, grad_col, grad_diag, grad_x, gs, gb,
            n, m, D, int(diag_offset), *_strides(x), *_strides(y),
            TRANSPOSED=False, BLOCK_A=ba, BLOCK_B=bb, BLOCK_K=bk, BLOCK_DO=bdo, num_warps=warps, **common)
        # grad_y: y's rows against every x block, the logits transposed
        ba, bb, bk, bdo, warps = _blocks(x.dtype, m, n, D, backward=True)
        if softmax:
            stats = (col, grad_col, row, grad_row)
        else:  # sigmoid: the cotangent of x's rows (the b side) multiplies sigmoid(L); stat/gstat_a are not read
            stats = (row, grad_row, row, grad_row)
        _stats_bwd_kernel[(triton.cdiv(m, ba), max(1, triton.cdiv(D, bdo)))](
            y, x, scale_t, bias_t, gmul, *stats, grad_diag, grad_y, gs, gb,
            m, n, D, -int(diag_offset), *_strides(y), *_strides(x),
            TRANSPOSED=True, BLOCK_A=ba, BLOCK_B=bb, BLOCK_K=bk, BLOCK_DO=bdo, num_warps=warps, **common)
    grad_scale = gs.sum().reshape(logit_scale.shape).to(logit_scale.dtype)
    grad_bias = gb.sum().reshape(logit_bias.shape).to(logit_bias.dtype) if logit_bias is not None \
        else x.new_empty((0,))
    return grad_x, grad_y, grad_scale, grad_bias


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs for pyvl.kernels.aot: the tiles the launchers pick on a GPU (_blocks) at CLIP's feature
# sizes (the d loop is not unrolled, so d itself is a runtime value; the tiles are what sets registers and shared
# memory), in every dtype launched on a GPU. "op" names the public op for `pyvl info --compile`.

_F32_STATS = {"scale_ptr": "*fp32", "bias_ptr": "*fp32", "row_ptr": "*fp32", "diag_ptr": "*fp32",
              "cmax_ptr": "*fp32", "csum_ptr": "*fp32"}
_F32_BWD = {"scale_ptr": "*fp32", "bias_ptr": "*fp32", "gmul_ptr": "*fp32", "stat_a_ptr": "*fp32",
            "gstat_a_ptr": "*fp32", "stat_b_ptr": "*fp32", "gstat_b_ptr": "*fp32", "gdiag_ptr": "*fp32",
            "gs_ptr": "*fp32", "gb_ptr": "*fp32"}


def _aot_specs():
    specs = []
    for dtypes, (ca, cb, ck, cdo, warps, bwd_warps) in ((("fp16", "bf16"), _TILES["wide"]),
                                                         (("fp32",), _TILES["fp32"])):
        specs.append(dict(kernel=_similarity_kernel, dtypes=dtypes, num_warps=warps, op="similarity_logits",
                          pointers={"scale_ptr": "*fp32", "bias_ptr": "*fp32"},
                          constexprs=dict(NORMALIZE=True, HAS_BIAS=True, BLOCK_M=ca, BLOCK_N=cb, BLOCK_K=ck)))
        for softmax in (True, False):
            tag = "softmax" if softmax else "sigmoid"
            specs.append(dict(kernel=_stats_fwd_kernel, dtypes=dtypes, num_warps=warps, op="contrastive_loss",
                              label=f"_stats_fwd_kernel[{tag}]", pointers=_F32_STATS,
                              constexprs=dict(SOFTMAX=softmax, BLOCK_M=ca, BLOCK_N=cb, BLOCK_K=ck)))
            for transposed in (False, True):
                specs.append(dict(kernel=_stats_bwd_kernel, dtypes=dtypes, num_warps=bwd_warps, op="contrastive_loss",
                                  label=f"_stats_bwd_kernel[{tag}{',T' if transposed else ''}]", pointers=_F32_BWD,
                                  constexprs=dict(SOFTMAX=softmax, TRANSPOSED=transposed, BLOCK_A=min(ca, _BWD_ROWS),
                                                  BLOCK_B=cb, BLOCK_K=ck, BLOCK_DO=cdo)))
    return specs


AOT_SPECS = _aot_specs()
