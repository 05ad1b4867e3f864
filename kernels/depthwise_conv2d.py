"""Triton kernels for the depthwise-separable convolution family: depthwise forward, both depthwise backwards
and the fused depthwise -> bias -> act -> pointwise -> bias -> act block.

Every kernel works on a [pixels, channels] tile and addresses memory through strides passed at launch, so one
kernel serves dense NCHW and channels_last alike: in NCHW a tile reads contiguous runs along the pixel axis, in
channels_last along the channel axis. Offsets are int64 (video-sized tensors pass 2^31 elements).

The launchers only allocate outputs, pick block sizes and launch; argument checks live in pyvl.ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyvl.ops._checks import memory_format_of


@triton.jit
def _activate(v, ACT: tl.constexpr):
    if ACT == 1:
        v = tl.maximum(v, 0.0)
    elif ACT == 2:
        v = tl.minimum(tl.maximum(v, 0.0), 6.0)
    return v


@triton.jit
def _depthwise_tile(x_ptr, w_ptr, n, p, c, H, W, OW,
                    sxn, sxc, sxh, sxw, swc, swh, sww,
                    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                    mask_p, mask_c, ACC: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Depthwise sum over the KHxKW taps for pixels p (flat oh*OW+ow of image n) x channels c, in ACC."""
    oh = (p // OW).to(tl.int64)
    ow = (p % OW).to(tl.int64)
    c64 = c.to(tl.int64)
    base = x_ptr + n * sxn + c64[None, :] * sxc
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for kh in range(KH):
        ih = oh * stride_h - pad_h + kh * dil_h
        row_ok = mask_p & (ih >= 0) & (ih < H)
        for kw in range(KW):
            iw = ow * stride_w - pad_w + kw * dil_w
            ok = row_ok & (iw >= 0) & (iw < W)
            xv = tl.load(base + (ih * sxh + iw * sxw)[:, None], mask=ok[:, None] & mask_c[None, :], other=0.0)
            wv = tl.load(w_ptr + c64 * swc + kh * swh + kw * sww, mask=mask_c, other=0.0)
            acc += xv.to(ACC) * wv.to(ACC)[None, :]
    return acc


@triton.jit
def _depthwise_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr,
                          C, H, W, OH, OW,
                          sxn, sxc, sxh, sxw, swc, swh, sww, son, soc, soh, sow,
                          stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                          HAS_BIAS: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = p < OH * OW
    mask_c = c < C
    acc = _depthwise_tile(x_ptr, w_ptr, n, p, c, H, W, OW, sxn, sxc, sxh, sxw, swc, swh, sww,
                          stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, mask_p, mask_c, ACC, KH, KW, BLOCK_P, BLOCK_C)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=mask_c, other=0.0).to(ACC)[None, :]
    oh = (p // OW).to(tl.int64)
    ow = (p % OW).to(tl.int64)
    offs = n * son + c.to(tl.int64)[None, :] * soc + (oh * soh + ow * sow)[:, None]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def _depthwise_bwd_input_kernel(g_ptr, w_ptr, gx_ptr,
                                C, H, W, OH, OW,
                                sgn, sgc, sgh, sgw, swc, swh, sww, sxn, sxc, sxh, sxw,
                                stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                KH: tl.constexpr, KW: tl.constexpr,
                                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    # Gather form (each program owns its input pixels) rather than scattering from the outputs: no atomics and
    # a deterministic result. Input pixel ih takes tap kh from output row (ih + pad - kh*dil) / stride when that
    # division is exact and in range.
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = p < H * W
    mask_c = c < C
    ih = (p // W).to(tl.int64)
    iw = (p % W).to(tl.int64)
    c64 = c.to(tl.int64)
    base = g_ptr + n * sgn + c64[None, :] * sgc
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for kh in range(KH):
        th = ih + pad_h - kh * dil_h
        # clamp before dividing: the sign of % and // on negatives differs between backends
        th_safe = tl.maximum(th, 0)
        oh = th_safe // stride_h
        row_ok = mask_p & (th >= 0) & (th_safe % stride_h == 0) & (oh < OH)
        for kw in range(KW):
            tw = iw + pad_w - kw * dil_w
            tw_safe = tl.maximum(tw, 0)
            ow = tw_safe // stride_w
            ok = row_ok & (tw >= 0) & (tw_safe % stride_w == 0) & (ow < OW)
            gv = tl.load(base + (oh * sgh + ow * sgw)[:, None], mask=ok[:, None] & mask_c[None, :], other=0.0)
            wv = tl.load(w_ptr + c64 * swc + kh * swh + kw * sww, mask=mask_c, other=0.0)
            acc += gv.to(ACC) * wv.to(ACC)[None, :]
    offs = n * sxn + c64[None, :] * sxc + (ih * sxh + iw * sxw)[:, None]
    tl.store(gx_ptr + offs, acc.to(gx_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def _depthwise_bwd_weight_kernel(g_ptr, x_ptr, gw_ptr,
                                 C, H, W, OH, OW, total,
                                 sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
                                 stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                 KW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                                 ACC: tl.constexpr):
    # One program per (channel block, tap) reduces over all N*OH*OW output pixels: every weight element has a
    # single owner, so no atomics and a deterministic sum. The [BLOCK_P, BLOCK_C] partial sums are reduced over
    # pixels only once, at the end.
    pid_c = tl.program_id(0)
    tap = tl.program_id(1)
    kh = tap // KW
    kw = tap % KW
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    c64 = c.to(tl.int64)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    ohw = OH * OW
    for start in range(0, total, BLOCK_P):
        q = start + tl.arange(0, BLOCK_P).to(tl.int64)
        mask_q = q < total
        n = q // ohw
        r = q % ohw
        oh = r // OW
        ow = r % OW
        ih = oh * stride_h - pad_h + kh * dil_h
        iw = ow * stride_w - pad_w + kw * dil_w
        ok = mask_q & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        m2 = mask_c[None, :]
        gv = tl.load(g_ptr + (n * sgn + oh * sgh + ow * sgw)[:, None] + c64[None, :] * sgc,
                     mask=mask_q[:, None] & m2, other=0.0)
        xv = tl.load(x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + c64[None, :] * sxc,
                     mask=ok[:, None] & m2, other=0.0)
        acc += gv.to(ACC) * xv.to(ACC)
    gw = tl.sum(acc, axis=0)
    # grad_weight is a fresh contiguous [C, 1, KH, KW]: channel c, tap t at c*KH*KW + t
    KK = tl.num_programs(1)
    tl.store(gw_ptr + c64 * KK + tap, gw.to(gw_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _dsconv_fwd_kernel(x_ptr, dw_w_ptr, dw_b_ptr, pw_w_ptr, pw_b_ptr, out_ptr,
                       C, C_OUT, H, W, OH, OW,
                       sxn, sxc, sxh, sxw, swc, swh, sww, spo, spc, son, soc, soh, sow,
                       stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                       HAS_DW_BIAS: tl.constexpr, HAS_PW_BIAS: tl.constexpr,
                       DW_ACT: tl.constexpr, PW_ACT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr,
                       ACC: tl.constexpr):
    # The depthwise result of a [BLOCK_P, BLOCK_C] tile lives only in registers: it is activated, rounded to
    # the input dtype (what an unfused fp16 block would store) and fed straight to tl.dot against a
    # [BLOCK_C, BLOCK_CO] slice of the pointwise weight. Programs over different output-channel blocks
    # recompute the depthwise tile; the launcher makes BLOCK_CO cover C_out where it can.
    DT: tl.constexpr = x_ptr.dtype.element_ty
    pid_p = tl.program_id(0)
    pid_o = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    co = pid_o * BLOCK_CO + tl.arange(0, BLOCK_CO)
    mask_p = p < OH * OW
    mask_co = co < C_OUT
    co64 = co.to(tl.int64)
    acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask_c = c < C
        h = _depthwise_tile(x_ptr, dw_w_ptr, n, p, c, H, W, OW, sxn, sxc, sxh, sxw, swc, swh, sww,
                            stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, mask_p, mask_c, ACC, KH, KW,
                            BLOCK_P, BLOCK_C)
        if HAS_DW_BIAS:
            h += tl.load(dw_b_ptr + c, mask=mask_c, other=0.0).to(ACC)[None, :]
        # padded channels hold act(0) = 0 and meet zero weights below, so they add nothing
        h = _activate(h, DW_ACT)
        wt = tl.load(pw_w_ptr + c.to(tl.int64)[:, None] * spc + co64[None, :] * spo,
                     mask=mask_c[:, None] & mask_co[None, :], other=0.0)
        if DT == tl.float32:
            # ieee: on the GPU tl.dot defaults to tf32, which would not match the fp32 reference
            acc = tl.dot(h, wt, acc, input_precision="ieee")
        elif DT == tl.float64:
            acc = tl.dot(h, wt.to(tl.float64), acc, input_precision="ieee")
        else:
            acc = tl.dot(h.to(DT), wt, acc)
    if HAS_PW_BIAS:
        acc += tl.load(pw_b_ptr + co, mask=mask_co, other=0.0).to(ACC)[None, :]
    acc = _activate(acc, PW_ACT)
    oh = (p // OW).to(tl.int64)
    ow = (p % OW).to(tl.int64)
    offs = n * son + co64[None, :] * soc + (oh * soh + ow * sow)[:, None]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_co[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers


def _out_size(size, k, stride, pad, dil):
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _acc_dtype(t):
    # float64 keeps float64 math (gradcheck in float64); everything narrower accumulates in float32
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _strides4(t):
    return tuple(int(s) for s in t.stride())


def _tile(pixels: int, channels: int, channels_last: bool, elements: int = 1024, min_block: int = 1):
    """(BLOCK_P, BLOCK_C) of about `elements` accumulators: 8 per thread at 4 warps. Each element also carries
    a 64-bit address and its masks; ptxas -v (pyvl.kernels.aot) shows 2048 elements reaching 255 registers.

    The contiguous axis of the layout gets the larger share so loads coalesce: channels in channels_last,
    pixels in NCHW.
    """
    np2 = triton.next_power_of_2
    if channels_last:
        block_c = max(min_block, min(64, np2(channels)))
        block_p = max(min_block, min(np2(pixels), elements // block_c))
    else:
        block_p = max(min_block, min(128, np2(pixels)))
        block_c = max(min_block, min(np2(channels), elements // block_p))
    return block_p, block_c


def _empty_like_layout(ref: torch.Tensor, shape, dtype):
    return torch.empty(shape, dtype=dtype, device=ref.device, memory_format=memory_format_of(ref))


def depthwise_conv2d_forward(x, weight, bias, stride, padding, dilation):
    N, C, H, W = x.shape
    KH, KW = int(weight.shape[2]), int(weight.shape[3])
    OH = _out_size(H, KH, stride[0], padding[0], dilation[0])
    OW = _out_size(W, KW, stride[1], padding[1], dilation[1])
    out = _empty_like_layout(x, (N, C, OH, OW), x.dtype)
    block_p, block_c = _tile(OH * OW, C, memory_format_of(x) == torch.channels_last)
    grid = (triton.cdiv(OH * OW, block_p), triton.cdiv(C, block_c), N)
    sw = _strides4(weight)
    _depthwise_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, out,
        C, H, W, OH, OW, *_strides4(x), sw[0], sw[2], sw[3], *_strides4(out),
        int(stride[0]), int(stride[1]), int(padding[0]), int(padding[1]), int(dilation[0]), int(dilation[1]),
        HAS_BIAS=bias is not None, KH=KH, KW=KW, BLOCK_P=block_p, BLOCK_C=block_c, ACC=_acc_dtype(x),
        num_warps=4)
    return out


def depthwise_conv2d_backward_input(grad_out, weight, input_size, stride, padding, dilation):
    N, C, OH, OW = grad_out.shape
    H, W = int(input_size[0]), int(input_size[1])
    KH, KW = int(weight.shape[2]), int(weight.shape[3])
    grad_x = _empty_like_layout(grad_out, (N, C, H, W), grad_out.dtype)
    block_p, block_c = _tile(H * W, C, memory_format_of(grad_out) == torch.channels_last)
    grid = (triton.cdiv(H * W, block_p), triton.cdiv(C, block_c), N)
    sw = _strides4(weight)
    _depthwise_bwd_input_kernel[grid](
        grad_out, weight, grad_x,
        C, H, W, OH, OW, *_strides4(grad_out), sw[0], sw[2], sw[3], *_strides4(grad_x),
        int(stride[0]), int(stride[1]), int(padding[0]), int(padding[1]), int(dilation[0]), int(dilation[1]),
        KH=KH, KW=KW, BLOCK_P=block_p, BLOCK_C=block_c, ACC=_acc_dtype(grad_out), num_warps=4)
    return grad_x


def depthwise_conv2d_backward_weight(grad_out, x, kernel_size, stride, padding, dilation):
    N, C, H, W = x.shape
    OH, OW = int(grad_out.shape[2]), int(grad_out.shape[3])
    KH, KW = int(kernel_size[0]), int(kernel_size[1])
    grad_w = torch.empty((C, 1, KH, KW), dtype=x.dtype, device=x.device)
    block_p, block_c = _tile(N * OH * OW, C, memory_format_of(x) == torch.channels_last)
    grid = (triton.cdiv(C, block_c), KH * KW)
    _depthwise_bwd_weight_kernel[grid](
        grad_out, x, grad_w,
        C, H, W, OH, OW, N * OH * OW, *_strides4(grad_out), *_strides4(x),
        int(stride[0]), int(stride[1]), int(padding[0]), int(padding[1]), int(dilation[0]), int(dilation[1]),
        KW=KW, BLOCK_P=block_p, BLOCK_C=block_c, ACC=_acc_dtype(x), num_warps=4)
    return grad_w


def _dsconv_tiles(C, C_out, pixels, dtype):
    """(BLOCK_P, BLOCK_C, BLOCK_CO, num_warps) for the fused kernel.

    tl.dot wants every block dim >= 16. One output-channel block as wide as C_out (up to 128) avoids recomputing
    the depthwise tile per block; 8 warps keep the 64 x 128 accumulator at 32 registers per thread. An fp32
    (ieee) dot runs on FMAs and stages its operands in shared memory: at BLOCK_C 32 x BLOCK_CO 128 it took 190 KB,
    over sm_80's limit (pyvl.kernels.aot), so fp32 stays 64 wide and BLOCK_C stays 16.
    """
    np2 = triton.next_power_of_2
    wide = 64 if dtype in (torch.float32, torch.float64) else 128
    block_co = max(16, min(wide, np2(C_out)))
    block_c = 16
    block_p = max(16, min(64, np2(pixels)))
    return block_p, block_c, block_co, 8


def dsconv2d_forward(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation,
                     dw_activation: int, pw_activation: int):
    N, C, H, W = x.shape
    C_out = int(pw_weight.shape[0])
    KH, KW = int(dw_weight.shape[2]), int(dw_weight.shape[3])
    OH = _out_size(H, KH, stride[0], padding[0], dilation[0])
    OW = _out_size(W, KW, stride[1], padding[1], dilation[1])
    out = _empty_like_layout(x, (N, C_out, OH, OW), x.dtype)
    block_p, block_c, block_co, num_warps = _dsconv_tiles(C, C_out, OH * OW, x.dtype)
    grid = (triton.cdiv(OH * OW, block_p), triton.cdiv(C_out, block_co), N)
    sw = _strides4(dw_weight)
    sp = tuple(int(s) for s in pw_weight.stride())
    _dsconv_fwd_kernel[grid](
        x, dw_weight, dw_bias if dw_bias is not None else dw_weight, pw_weight,
        pw_bias if pw_bias is not None else pw_weight, out,
        C, C_out, H, W, OH, OW, *_strides4(x), sw[0], sw[2], sw[3], sp[0], sp[1], *_strides4(out),
        int(stride[0]), int(stride[1]), int(padding[0]), int(padding[1]), int(dilation[0]), int(dilation[1]),
        HAS_DW_BIAS=dw_bias is not None, HAS_PW_BIAS=pw_bias is not None,
        DW_ACT=int(dw_activation), PW_ACT=int(pw_activation), KH=KH, KW=KW,
        BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_CO=block_co, ACC=_acc_dtype(x), num_warps=num_warps)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs for pyvl.kernels.aot: each kernel at the largest tiles its launcher picks, in
# every dtype it is launched with on a GPU (float64 is left out: no GPU path relies on it for speed).

_GPU_DTYPES = ("fp32", "fp16", "bf16")
_FLAGS = dict(KH=3, KW=3, ACC=tl.float32)

AOT_SPECS = [
    # NCHW tiles: tall in pixels; channels_last tiles are the same size, so the same register budget
    dict(kernel=_depthwise_fwd_kernel, dtypes=_GPU_DTYPES, num_warps=4,
         constexprs=dict(HAS_BIAS=True, BLOCK_P=128, BLOCK_C=8, **_FLAGS)),
    dict(kernel=_depthwise_bwd_input_kernel, dtypes=_GPU_DTYPES, num_warps=4,
         constexprs=dict(BLOCK_P=128, BLOCK_C=8, **_FLAGS)),
    dict(kernel=_depthwise_bwd_weight_kernel, dtypes=_GPU_DTYPES, num_warps=4,
         constexprs=dict(KW=3, BLOCK_P=16, BLOCK_C=64, ACC=tl.float32)),
    dict(kernel=_dsconv_fwd_kernel, dtypes=("fp16", "bf16"), num_warps=8,
         constexprs=dict(HAS_DW_BIAS=True, HAS_PW_BIAS=True, DW_ACT=2, PW_ACT=1, BLOCK_P=64, BLOCK_C=16,
                         BLOCK_CO=128, **_FLAGS)),
    dict(kernel=_dsconv_fwd_kernel, dtypes=("fp32",), num_warps=8,
         constexprs=dict(HAS_DW_BIAS=True, HAS_PW_BIAS=True, DW_ACT=2, PW_ACT=1, BLOCK_P=64, BLOCK_C=16,
                         BLOCK_CO=64, **_FLAGS)),
]
