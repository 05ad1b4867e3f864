"""Argument checks shared by the public ops: each error names the argument and what was expected."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, *, dim: int | None = None, like: torch.Tensor | None = None,
                 like_name: str = "x") -> None:
    """`t` is a floating-point tensor (of `dim` dims), on the device and of the dtype of `like` (named
    `like_name` in the message) if given."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name} must be on {like.device} like {like_name}, got {t.device}")
        if t.dtype != like.dtype:
            raise TypeError(f"{name} must have dtype {like.dtype} like {like_name}, got {t.dtype}")


def pair(name: str, value, *, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a pair."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(value)}")
    return int(value[0]), int(value[1])


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The layout pyvl's kernels run and answer in; mirrors layout_of() in csrc/bindings/common.h."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def as_kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """`t` dense in the memory format torch itself would give its result (channels_last stays channels_last,
    also when sliced), so the kernels see a dense NCHW or NHWC tensor and answer in the caller's layout."""
    fmt = torch.channels_last if (t.dim() == 4 and _suggest_memory_format(t) == torch.channels_last) \
        else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def _suggest_memory_format(t: torch.Tensor) -> torch.memory_format:
    from torch._prims_common import suggest_memory_format

    return suggest_memory_format(t)
