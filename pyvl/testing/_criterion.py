"""The error criterion of DESIGN.md (the FlashAttention standard).

With `ref` computed in float64: max|out - ref| <= 2 * max|torch_out - ref| + atol, where torch_out is PyTorch's
own eager result in out's dtype. A kernel may be as inaccurate as PyTorch is in that dtype, twice over, and no
more. `atol` absorbs the case where PyTorch happens to be exact; by default it is a few units in the last place
of the dtype, scaled by the magnitude of the reference.
"""
from __future__ import annotations

import torch

# Units in the last place, per dtype, that atol allows (times max(1, max|ref|)).
_ATOL_EPS = {torch.float64: 1e-12, torch.float32: 4e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def default_atol(dtype: torch.dtype, ref: torch.Tensor) -> float:
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    return _ATOL_EPS.get(dtype, 0.0) * scale


def _to64(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().to(torch.float64)
    if isinstance(value, (list, tuple)):
        return type(value)(_to64(v) for v in value)
    return value


def check_error_criterion(out: torch.Tensor, ref: torch.Tensor, torch_out: torch.Tensor, *, atol: float | None = None,
                          name: str = "output") -> None:
    """Raises AssertionError unless max|out - ref| <= 2 * max|torch_out - ref| + atol (ref in float64)."""
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    ref = ref.detach().to(torch.float64)
    err = (out.detach().to(torch.float64) - ref).abs()
    torch_err = (torch_out.detach().to(torch.float64) - ref).abs()
    if not torch.isfinite(ref).all():
        # Non-finite references must be matched exactly where they are non-finite.
        bad = ~torch.isfinite(ref)
        o, r = out.detach().to(torch.float64)[bad], ref[bad]
        if not (torch.equal(o.isnan(), r.isnan()) and torch.equal(o[~o.isnan()], r[~r.isnan()])):
            raise AssertionError(f"{name}: non-finite values differ from the reference")
        err, torch_err = err[~bad], torch_err[~bad]
    if err.numel() == 0:
        return
    if atol is None:
        atol = default_atol(out.dtype, ref)
    max_err, max_torch = float(err.nan_to_num(float("inf")).max()), float(torch_err.nan_to_num(0.0).max())
    bound = 2.0 * max_torch + atol
    if not max_err <= bound:
        where = tuple(int(i) for i in torch.unravel_index(err.nan_to_num(float("inf")).argmax(), out.shape)) \
            if out.dim() else ()
        raise AssertionError(
            f"{name} ({out.dtype}): max error {max_err:.3e} at {where} exceeds 2 x torch's error "
            f"{max_torch:.3e} + atol {atol:.3e} = {bound:.3e}")


def assert_close_to_reference(out, ref_fn, args, kwargs=None, *, atol: float | None = None,
                              name: str = "output") -> None:
    """Check `out` (a tensor or a tuple of tensors) against `ref_fn(*args, **kwargs)` by the error criterion.

    ref_fn is called twice: on float64 copies of the floating-point tensors in args (the truth) and on args as
    given (PyTorch's own result in the kernel's dtype).
    """
    kwargs = kwargs or {}
    with torch.no_grad():
        ref = ref_fn(*_to64(args), **_to64(kwargs))
        torch_out = ref_fn(*args, **kwargs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    torch_outs = torch_out if isinstance(torch_out, (tuple, list)) else (torch_out,)
    if not len(outs) == len(refs) == len(torch_outs):
        raise AssertionError(f"{name}: {len(outs)} outputs but the reference gives {len(refs)}")
    for i, (o, r, t) in enumerate(zip(outs, refs, torch_outs)):
        if o is None and r is None:
            continue
        check_error_criterion(o, r, t, atol=atol, name=name if len(outs) == 1 else f"{name}[{i}]")


def gradients(fn, args, grad_out=None, seed: int = 0):
    """(output, grads of every floating-point tensor in args that requires grad) of fn(*args).

    grad_out defaults to a fixed random cotangent, so that the gradients of two implementations (for example a
    kernel in float16 and the reference in float64) can be compared with check_error_criterion.
    """
    out = fn(*args)
    if grad_out is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype), allow_unused=True)
    return out, grads


def _leaves(args, dtype=None):
    """Fresh leaf copies of the floating-point tensors in args (cast to dtype if given) that require grad."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.detach().to(dtype) if dtype is not None else a.detach().clone()
            out.append(a.requires_grad_())
        else:
            out.append(a)
    return out


def assert_gradients_close_to_reference(fn, ref_fn, args, *, atol: float | None = None, seed: int = 0,
                                        name: str = "grad") -> None:
    """Forward and every input gradient of fn(*args) against ref_fn by the error criterion.

    The truth is ref_fn on float64 copies; PyTorch's own error comes from ref_fn in the inputs' dtype; the three
    use one fixed random cotangent. Layouts (strides) of args are preserved in the copies.
    """
    out, grads = gradients(fn, _leaves(args), seed=seed)
    ref, ref_grads = gradients(ref_fn, _leaves(args, torch.float64), seed=seed)
    torch_out, torch_grads = gradients(ref_fn, _leaves(args), seed=seed)
    check_error_criterion(out, ref, torch_out, atol=atol, name=f"{name}: output")
    for i, (g, r, t) in enumerate(zip(grads, ref_grads, torch_grads)):
        if g is None or r is None:
            if (g is None) != (r is None):
                raise AssertionError(f"{name}: gradient of input {i} is None on one side only")
            continue
        check_error_criterion(g, r, t, atol=atol, name=f"{name}: gradient of input {i}")
