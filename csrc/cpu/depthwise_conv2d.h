// Depthwise 2D convolution and the fused depthwise-separable block, on raw pointers (no torch), so that
// CMake can build and sanitize these kernels alone. The bindings in csrc/bindings/ turn tensors into calls.
#pragma once
#include <cstdint>

namespace pyvl {

enum class Layout : int { NCHW = 0, NHWC = 1 };
enum class Activation : int { None = 0, ReLU = 1, ReLU6 = 2 };

// Geometry of one depthwise convolution. Input [N, C, H, W], weight [C, 1, KH, KW] (stored as [C, KH, KW]),
// output [N, C, OH, OW], all dense in `layout` (NCHW or NHWC); OH = (H + 2*pad_h - dil_h*(KH-1) - 1)/stride_h + 1.
struct Conv2dShape {
  int64_t N, C, H, W;
  int64_t KH, KW;
  int64_t OH, OW;
  int64_t stride_h, stride_w;
  int64_t pad_h, pad_w;
  int64_t dil_h, dil_w;
};

namespace cpu {

// out = depthwise_conv(x, weight) + bias (bias may be null). Parallel over the machine's OpenMP threads.
template <typename T>
void depthwise_conv2d_forward(const T* x, const T* weight, const T* bias, T* out, const Conv2dShape& s,
                              Layout layout);

// grad_x = d(out)/d(x)^T grad_out. grad_x is written, not accumulated.
template <typename T>
void depthwise_conv2d_backward_input(const T* grad_out, const T* weight, T* grad_x, const Conv2dShape& s,
                                     Layout layout);

// grad_weight [C, KH, KW] = sum over n, oh, ow of grad_out * x-patch. Written, not accumulated.
template <typename T>
void depthwise_conv2d_backward_weight(const T* grad_out, const T* x, T* grad_weight, const Conv2dShape& s,
                                      Layout layout);

// The fused block out = act_pw(pw_weight . act_dw(depthwise(x) + dw_bias) + pw_bias), whose depthwise
// intermediate lives only in cache-sized tiles. pw_weight is [C_out, C]; out is [N, C_out, OH, OW] in `layout`.
template <typename T>
void dsconv2d_forward(const T* x, const T* dw_weight, const T* dw_bias, const T* pw_weight, const T* pw_bias, T* out,
                      const Conv2dShape& s, int64_t C_out, Activation act_dw, Activation act_pw, Layout layout);

}  // namespace cpu
}  // namespace pyvl
