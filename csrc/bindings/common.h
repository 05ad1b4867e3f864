// Shared glue between at::Tensor and the raw-pointer kernels.
#pragma once
#include <ATen/ATen.h>

#include "cpu/depthwise_conv2d.h"

namespace pyvl {

// The layout a kernel runs in: channels_last when the tensor is dense in it (and not also dense NCHW),
// else NCHW. pyvl/ops/_layout.py mirrors this rule for the fake kernels.
inline Layout layout_of(const at::Tensor& t) {
  if (!t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) return Layout::NHWC;
  return Layout::NCHW;
}

inline at::MemoryFormat memory_format_of(Layout layout) {
  return layout == Layout::NHWC ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline Conv2dShape conv2d_shape(int64_t N, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  Conv2dShape s{};
  s.N = N; s.C = C; s.H = H; s.W = W; s.KH = KH; s.KW = KW;
  s.stride_h = stride[0]; s.stride_w = stride[1];
  s.pad_h = padding[0]; s.pad_w = padding[1];
  s.dil_h = dilation[0]; s.dil_w = dilation[1];
  s.OH = (H + 2 * s.pad_h - s.dil_h * (KH - 1) - 1) / s.stride_h + 1;
  s.OW = (W + 2 * s.pad_w - s.dil_w * (KW - 1) - 1) / s.stride_w + 1;
  return s;
}

// Kernels compute in float or double; half and bfloat16 are computed in float and rounded once at the end.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace pyvl
