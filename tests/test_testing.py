"""pyvl.testing itself: the criterion passes PyTorch's own result and rejects a kernel that is slightly wrong."""
import pytest
import torch
from hypothesis import given

from pyvl.reference import depthwise_conv2d as ref
from pyvl.testing import assert_close_to_reference, assert_gradients_close_to_reference, check_error_criterion
from pyvl.testing import strategies as pst


def _args(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 9, 9, generator=g).to(dtype)
    w = torch.randn(8, 1, 3, 3, generator=g).to(dtype)
    return x, w, None, (1, 1), (1, 1), (1, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_torch_itself_passes(dtype):
    args = _args(dtype)
    assert_close_to_reference(ref.depthwise_conv2d(*args), ref.depthwise_conv2d, args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_wrong_kernel_fails(dtype):
    args = _args(dtype)
    out = ref.depthwise_conv2d(*args).clone()
    out[1, 3, 4, 4] += 0.05 * float(out.abs().max())  # one element off by 5% of the range
    with pytest.raises(AssertionError, match="exceeds 2 x torch's error"):
        assert_close_to_reference(out, ref.depthwise_conv2d, args)


def test_a_wrong_gradient_fails():
    args = _args(torch.float32)[:2]

    def wrong(x, w):  # right forward, gradient of x scaled by 1.01
        y = ref.depthwise_conv2d(x, w, None, (1, 1), (1, 1), (1, 1))
        return y + 0.01 * (ref.depthwise_conv2d(x, w, None, (1, 1), (1, 1), (1, 1)) -
                           ref.depthwise_conv2d(x.detach(), w, None, (1, 1), (1, 1), (1, 1)))

    with pytest.raises(AssertionError, match="gradient of input 0"):
        assert_gradients_close_to_reference(wrong, lambda x, w: ref.depthwise_conv2d(x, w, None, (1, 1), (1, 1),
                                                                                      (1, 1)), args)


def test_non_finite_must_match():
    ref64 = torch.tensor([1.0, float("nan"), float("inf")], dtype=torch.float64)
    check_error_criterion(ref64.float(), ref64, ref64.float())
    with pytest.raises(AssertionError, match="non-finite"):
        check_error_criterion(torch.tensor([1.0, 0.0, float("inf")]), ref64, ref64.float())


def test_shape_mismatch_fails():
    with pytest.raises(AssertionError, match="shape"):
        check_error_criterion(torch.zeros(2), torch.zeros(3, dtype=torch.float64), torch.zeros(3))


@given(pst.depthwise_problems())
def test_problems_are_valid(problem):
    x, w, b = problem.make_inputs()
    assert x.shape == (problem.N, problem.C, problem.H, problem.W)
    assert min(problem.output_size()) >= 1
    if problem.layout == "sliced":
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    out = ref.depthwise_conv2d(x, w, b, problem.stride, problem.padding, problem.dilation)
    assert out.shape[2:] == problem.output_size()
