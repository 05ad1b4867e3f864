"""Depthwise convolution and the fused depthwise-separable block (MobileNetV1's building block).

Public ops: `depthwise_conv2d` and `dsconv2d`. Each checks its arguments, chooses a backend
(pyvl._backend.choose) and calls one of:
  reference  pyvl.reference.depthwise_conv2d (PyTorch; autograd by PyTorch)
  cpu/cuda   torch.ops.pyvl.depthwise_conv2d / dsconv2d, C++ and CUDA kernels in csrc/ (one op, two dispatch keys)
  triton     torch.ops.pyvl.depthwise_conv2d_triton / dsconv2d_triton, custom ops over pyvl.kernels
The compiled and Triton ops get fake kernels and autograd here, so they work under torch.compile(fullgraph=True).

NaN policy: NaN and inf propagate as in IEEE arithmetic, as in torch.nn.functional.conv2d; nothing is checked
(a check would read the whole input once more).
"""
from __future__ import annotations

import torch

from .. import _backend, _ext  # noqa: F401  (_ext registers the C++ schemas)
from ..reference import depthwise_conv2d as ref
from ._checks import as_kernel_layout, check_tensor, memory_format_of, pair

ACTIVATIONS = {"none": 0, "relu": 1, "relu6": 2}

__all__ = ["depthwise_conv2d", "dsconv2d", "fold_batch_norm", "ACTIVATIONS"]


# ----------------------------------------------------------------------------------------------------------------
# Argument checks


def _output_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _check_geometry(x, weight, stride, padding, dilation, op):
    """Checks x [N, C, H, W] and weight [C, 1, KH, KW]; returns stride, padding, dilation as pairs."""
    check_tensor("x", x, dim=4)
    weight_name = "weight" if op == "depthwise_conv2d" else "dw_weight"
    check_tensor(weight_name, weight, dim=4, like=x)
    C = x.shape[1]
    if C < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"x must have at least one channel, row and column, got shape {tuple(x.shape)}")
    if weight.shape[0] != C or weight.shape[1] != 1:
        raise ValueError(f"{weight_name} must have shape [C, 1, KH, KW] with C = {C} (x's channels), "
                         f"got {tuple(weight.shape)}")
    KH, KW = weight.shape[2], weight.shape[3]
    if KH % 2 == 0 or KW % 2 == 0:
        raise ValueError(f"{weight_name} must have odd kernel sizes, got {KH}x{KW}")
    stride = pair("stride", stride, minimum=1)
    dilation = pair("dilation", dilation, minimum=1)
    if padding is None:
        padding = (dilation[0] * (KH - 1) // 2, dilation[1] * (KW - 1) // 2)
    elif padding == "same":
        if stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1, got stride {stride}")
        padding = (dilation[0] * (KH - 1) // 2, dilation[1] * (KW - 1) // 2)
    elif padding == "valid":
        padding = (0, 0)
    elif isinstance(padding, str):
        raise ValueError(f"padding must be an int, a pair of ints, None, 'same' or 'valid', got {padding!r}")
    else:
        padding = pair("padding", padding, minimum=0)
    OH = _output_size(x.shape[2], KH, stride[0], padding[0], dilation[0])
    OW = _output_size(x.shape[3], KW, stride[1], padding[1], dilation[1])
    if OH < 1 or OW < 1:
        raise ValueError(f"padding {padding} is too small for input {tuple(x.shape[2:])} with kernel {KH}x{KW} "
                         f"and dilation {dilation}: the output would be {OH}x{OW}")
    return stride, padding, dilation


def _check_bias(name, bias, n, x):
    if bias is None:
        return
    check_tensor(name, bias, dim=1, like=x)
    if bias.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {tuple(bias.shape)}")


def _check_activation(name, activation):
    if activation is None:
        activation = "none"
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name} must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    return activation


# ----------------------------------------------------------------------------------------------------------------
# Fake kernels: the output's shape and layout, mirroring the C++ bindings.


def _fake_out(x, channels, OH, OW):
    return x.new_empty((x.shape[0], channels, OH, OW)).contiguous(memory_format=memory_format_of(x))


def _fake_depthwise(x, weight, bias, stride, padding, dilation):
    OH = _output_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    OW = _output_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    return _fake_out(x, x.shape[1], OH, OW)


def _fake_backward_input(grad_out, weight, input_size, stride, padding, dilation):
    return grad_out.new_empty((grad_out.shape[0], grad_out.shape[1], input_size[0], input_size[1])).contiguous(
        memory_format=memory_format_of(grad_out))


def _fake_backward_weight(grad_out, x, kernel_size, stride, padding, dilation):
    return x.new_empty((x.shape[1], 1, kernel_size[0], kernel_size[1]))


def _fake_dsconv(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, dw_activation, pw_activation):
    OH = _output_size(x.shape[2], dw_weight.shape[2], stride[0], padding[0], dilation[0])
    OW = _output_size(x.shape[3], dw_weight.shape[3], stride[1], padding[1], dilation[1])
    return _fake_out(x, pw_weight.shape[0], OH, OW)


# ----------------------------------------------------------------------------------------------------------------
# Triton ops: custom ops over the launchers in pyvl.kernels (custom_op rather than triton_op: the latter fails
# under torch.compile and opcheck in the interpreter, see STYLE.md).


def _triton():
    from ..kernels import depthwise_conv2d as kernels

    return kernels


@torch.library.custom_op("pyvl::depthwise_conv2d_triton", mutates_args=())
def _depthwise_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
                      padding: list[int], dilation: list[int]) -> torch.Tensor:
    return _triton().depthwise_conv2d_forward(x, weight, bias, stride, padding, dilation)


@torch.library.custom_op("pyvl::depthwise_conv2d_backward_input_triton", mutates_args=())
def _depthwise_backward_input_triton(grad_out: torch.Tensor, weight: torch.Tensor, input_size: list[int],
                                     stride: list[int], padding: list[int], dilation: list[int]) -> torch.Tensor:
    return _triton().depthwise_conv2d_backward_input(grad_out, weight, input_size, stride, padding, dilation)


@torch.library.custom_op("pyvl::depthwise_conv2d_backward_weight_triton", mutates_args=())
def _depthwise_backward_weight_triton(grad_out: torch.Tensor, x: torch.Tensor, kernel_size: list[int],
                                      stride: list[int], padding: list[int], dilation: list[int]) -> torch.Tensor:
    return _triton().depthwise_conv2d_backward_weight(grad_out, x, kernel_size, stride, padding, dilation)


@torch.library.custom_op("pyvl::dsconv2d_triton", mutates_args=())
def _dsconv_triton(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor | None, pw_weight: torch.Tensor,
                   pw_bias: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
                   dw_activation: int, pw_activation: int) -> torch.Tensor:
    return _triton().dsconv2d_forward(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation,
                                      dw_activation, pw_activation)


# ----------------------------------------------------------------------------------------------------------------
# Autograd, shared by the compiled and the Triton ops.

_OPS = {
    # backend family: (forward, backward_input, backward_weight, fused)
    "compiled": ("depthwise_conv2d", "depthwise_conv2d_backward_input", "depthwise_conv2d_backward_weight",
                 "dsconv2d"),
    "triton": ("depthwise_conv2d_triton", "depthwise_conv2d_backward_input_triton",
               "depthwise_conv2d_backward_weight_triton", "dsconv2d_triton"),
}


def _op(family: str, i: int):
    return getattr(torch.ops.pyvl, _OPS[family][i]).default


def _depthwise_setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (stride, padding, dilation)
    ctx.has_bias = bias is not None


def _depthwise_grads(family, ctx, grad, x, weight, needs_x, needs_weight):
    stride, padding, dilation = ctx.geometry
    gx = gw = None
    if needs_x:
        gx = _op(family, 1)(grad, weight, list(x.shape[2:]), stride, padding, dilation)
    if needs_weight:
        gw = _op(family, 2)(grad, x, list(weight.shape[2:]), stride, padding, dilation)
    return gx, gw


def _make_depthwise_backward(family):
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx, gw = _depthwise_grads(family, ctx, grad, x, weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        gb = grad.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None, None

    return backward


def _activation_grad(grad, act, value):
    """grad through an activation whose output (or, for relu/relu6, any monotone stand-in) is `value`."""
    if act == 1:
        return grad * (value > 0)
    if act == 2:
        return grad * ((value > 0) & (value < 6))
    return grad


def _dsconv_setup_context(ctx, inputs, output):
    x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, dw_act, pw_act = inputs
    ctx.save_for_backward(x, dw_weight, dw_bias, pw_weight, output)
    ctx.geometry = (stride, padding, dilation)
    ctx.acts = (dw_act, pw_act)
    ctx.has_pw_bias = pw_bias is not None


def _make_dsconv_backward(family):
    def backward(ctx, grad):
        # The forward kept no intermediate; recompute the depthwise output h (one depthwise pass), then the
        # pointwise part is two small matmuls and the depthwise part the backend's own backward kernels.
        x, dw_weight, dw_bias, pw_weight, out = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        dw_act, pw_act = ctx.acts
        needs = ctx.needs_input_grad
        h = _op(family, 0)(x, dw_weight, dw_bias, stride, padding, dilation)
        g = _activation_grad(grad, pw_act, out)
        h_act = ref.activate(h, ("none", "relu", "relu6")[dw_act])
        N, C, OH, OW = h.shape
        g3 = g.reshape(N, g.shape[1], OH * OW)
        h3 = h_act.reshape(N, C, OH * OW)
        g_pw_w = torch.einsum("nop,ncp->oc", g3, h3) if needs[3] else None
        g_pw_b = g.sum((0, 2, 3)) if ctx.has_pw_bias and needs[4] else None
        g_h = torch.einsum("nop,oc->ncp", g3, pw_weight).reshape(N, C, OH, OW)
        g_h = _activation_grad(g_h, dw_act, h).contiguous(memory_format=memory_format_of(x))
        g_x, g_dw_w = _depthwise_grads(family, ctx, g_h, x, dw_weight, needs[0], needs[1])
        g_dw_b = g_h.sum((0, 2, 3)) if dw_bias is not None and needs[2] else None
        return g_x, g_dw_w, g_dw_b, g_pw_w, g_pw_b, None, None, None, None, None

    return backward


def _register():
    for family in _OPS:
        fwd, bwd_in, bwd_w, fused = (f"pyvl::{name}" for name in _OPS[family])
        torch.library.register_fake(fwd)(_fake_depthwise)
        torch.library.register_fake(bwd_in)(_fake_backward_input)
        torch.library.register_fake(bwd_w)(_fake_backward_weight)
        torch.library.register_fake(fused)(_fake_dsconv)
        torch.library.register_autograd(fwd, _make_depthwise_backward(family),
                                        setup_context=_depthwise_setup_context)
        torch.library.register_autograd(fused, _make_dsconv_backward(family), setup_context=_dsconv_setup_context)


if _ext.LOAD_ERROR is not None:  # no compiled ops to register for; the Triton ops need no extension
    _OPS.pop("compiled")
_register()


def _family(backend: str) -> str:
    return "triton" if backend == "triton" else "compiled"


# ----------------------------------------------------------------------------------------------------------------
# Public ops


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1,
                     padding=None, dilation=1, *, backend: str | None = None) -> torch.Tensor:
    """Depthwise 2D convolution: each channel of x [N, C, H, W] convolved with its own kernel weight[c, 0].

    Args:
        x: input, NCHW or channels_last (the output keeps the layout), float16/bfloat16/float32/float64.
        weight: [C, 1, KH, KW] with odd KH, KW.
        bias: [C] or None.
        stride, dilation: int or pair, >= 1.
        padding: int or pair >= 0; None (default) pads dilation*(K-1)//2 on each side (MobileNet's choice, equal
            to 'same' at stride 1); 'same' (stride 1 only) or 'valid'.
        backend: None (PYVL_BACKEND, else the fastest that can run), "reference", "cpu", "triton" or "cuda".

    Equals torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups=C).
    """
    stride, padding, dilation = _check_geometry(x, weight, stride, padding, dilation, "depthwise_conv2d")
    _check_bias("bias", bias, x.shape[1], x)
    training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                            or (bias is not None and bias.requires_grad))
    chosen = _backend.choose("depthwise_conv2d", backend, x, training)
    if chosen == "reference":
        return ref.depthwise_conv2d(x, weight, bias, stride, padding, dilation)
    x = as_kernel_layout(x)
    return _op(_family(chosen), 0)(x, weight, bias, list(stride), list(padding), list(dilation))


def dsconv2d(x: torch.Tensor, dw_weight: torch.Tensor, pw_weight: torch.Tensor, dw_bias: torch.Tensor | None = None,
             pw_bias: torch.Tensor | None = None, stride=1, padding=None, dilation=1, dw_activation="relu",
             pw_activation="relu", *, backend: str | None = None) -> torch.Tensor:
    """The fused depthwise-separable block: pw_activation(pointwise(dw_activation(depthwise(x) + dw_bias)) + pw_bias).

    The depthwise result never goes to main memory in the forward (cache-blocked tiles on the CPU, registers or
    shared memory on the GPU); the backward recomputes it once.

    Args:
        x: [N, C, H, W], NCHW or channels_last (kept in the output).
        dw_weight: [C, 1, KH, KW], odd KH, KW. dw_bias: [C] or None.
        pw_weight: [C_out, C] or [C_out, C, 1, 1]. pw_bias: [C_out] or None.
        stride, padding, dilation: as in depthwise_conv2d.
        dw_activation, pw_activation: "relu" (default), "relu6" or "none".
        backend: as in depthwise_conv2d.

    For an eval-mode block with batch norms, fold them first (fold_batch_norm).
    """
    stride, padding, dilation = _check_geometry(x, dw_weight, stride, padding, dilation, "dsconv2d")
    C = x.shape[1]
    check_tensor("pw_weight", pw_weight, like=x)
    if pw_weight.dim() == 4 and pw_weight.shape[2:] == (1, 1):
        pw_weight = pw_weight.reshape(pw_weight.shape[0], pw_weight.shape[1])
    if pw_weight.dim() != 2 or pw_weight.shape[1] != C or pw_weight.shape[0] < 1:
        raise ValueError(f"pw_weight must have shape [C_out, {C}] or [C_out, {C}, 1, 1] (C = x's channels), "
                         f"got {tuple(pw_weight.shape)}")
    _check_bias("dw_bias", dw_bias, C, x)
    _check_bias("pw_bias", pw_bias, pw_weight.shape[0], x)
    dw_activation = _check_activation("dw_activation", dw_activation)
    pw_activation = _check_activation("pw_activation", pw_activation)
    chosen = _backend.choose("dsconv2d", backend, x)
    if chosen == "reference":
        return ref.dsconv2d(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, dw_activation,
                            pw_activation)
    x = as_kernel_layout(x)
    return _op(_family(chosen), 3)(x, dw_weight, dw_bias, pw_weight, pw_bias, list(stride), list(padding),
                                   list(dilation), ACTIVATIONS[dw_activation], ACTIVATIONS[pw_activation])


def fold_batch_norm(weight, bias, bn):
    """Weight and bias of a convolution followed by an eval-mode BatchNorm module `bn`, with the norm folded in.

    Works for the depthwise weight [C, 1, KH, KW] and the pointwise weight [C_out, C(, 1, 1)] alike.
    """
    if not isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"bn must be a torch.nn.BatchNorm module, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn must track running statistics (track_running_stats=True) to be folded")
    if bn.num_features != weight.shape[0]:
        raise ValueError(f"bn has {bn.num_features} features but weight has {weight.shape[0]} output channels")
    return ref.fold_batch_norm(weight, bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
