// Depthwise 2D convolution and the fused depthwise-separable block on the GPU, on raw pointers and a stream (no
// torch), so that CMake can build these kernels alone. csrc/bindings/cuda/ turns tensors into these calls.
//
// Storage types: float, __half, __nv_bfloat16 (computed in float, rounded once on store) and double (computed in
// double). Every tensor is dense in `layout` (NCHW or NHWC); the weights are dense [C, KH, KW], the pointwise
// weight dense [C_out, C]. Semantics are those of the CPU kernels in csrc/cpu/depthwise_conv2d.h.
//
// Every launcher returns the launch's error (cudaSuccess when there was nothing to launch); it does not synchronize.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cpu/depthwise_conv2d.h"  // Conv2dShape, Layout, Activation (torch-free)

namespace pyvl {
namespace cuda {

// out = depthwise_conv(x, weight) + bias (bias may be null).
template <typename T>
cudaError_t depthwise_conv2d_forward(const T* x, const T* weight, const T* bias, T* out, const Conv2dShape& s,
                                     Layout layout, cudaStream_t stream);

// grad_x = d(out)/d(x)^T grad_out. grad_x is written, not accumulated.
template <typename T>
cudaError_t depthwise_conv2d_backward_input(const T* grad_out, const T* weight, T* grad_x, const Conv2dShape& s,
                                            Layout layout, cudaStream_t stream);

// Bytes of scratch memory depthwise_conv2d_backward_weight needs for this problem (0 when it needs none).
template <typename T>
size_t depthwise_conv2d_backward_weight_workspace_bytes(const Conv2dShape& s, Layout layout);

// grad_weight [C, KH, KW] = sum over n, oh, ow of grad_out * x-patch; written, not accumulated, deterministic (no
// atomics). `workspace` holds at least depthwise_conv2d_backward_weight_workspace_bytes<T>(s, layout) bytes,
// suitably aligned (any cudaMalloc'd or caching-allocator pointer is); it may be null when that is 0.
template <typename T>
cudaError_t depthwise_conv2d_backward_weight(const T* grad_out, const T* x, T* grad_weight, void* workspace,
                                             const Conv2dShape& s, Layout layout, cudaStream_t stream);

// out = act_pw(pw_weight . act_dw(depthwise(x) + dw_bias) + pw_bias), out [N, C_out, OH, OW] in `layout`. The
// depthwise intermediate lives only in shared memory. Biases may be null.
template <typename T>
cudaError_t dsconv2d_forward(const T* x, const T* dw_weight, const T* dw_bias, const T* pw_weight, const T* pw_bias,
                             T* out, const Conv2dShape& s, int64_t C_out, Activation act_dw, Activation act_pw,
                             Layout layout, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyvl
