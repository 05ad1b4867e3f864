// at::Tensor -> CUDA kernels for depthwise convolution and the fused block; the CUDA twin of
// csrc/bindings/depthwise_conv2d_cpu.cpp, with the same layout rule, output layouts and shape checks. Unlike the
// CPU bindings, half and bfloat16 stay in their storage type here: the kernels load them and accumulate in float,
// which saves the float copies of every tensor. Argument checking lives in pyvl/ops/; these TORCH_CHECKs guard
// memory safety.
#ifdef PYVL_WITH_CUDA
// The c10 stream and guard headers rather than ATen/cuda/CUDAContext.h: the latter pulls in cuSPARSE and cuBLAS
// headers, which a bare CUDA toolkit (nvcc only, as on the build machines) lacks. c10::cuda::getCurrentCUDAStream
// is the function at::cuda::getCurrentCUDAStream names.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bindings/common.h"
#include "cuda/depthwise_conv2d.cuh"

namespace pyvl {
namespace {

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with T the kernels' storage type for `dtype`.
template <typename F>
void dispatch_storage(at::ScalarType dtype, const char* name, F&& f) {
  switch (dtype) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kDouble: f(Tag<double>{}); break;
    case at::kHalf: f(Tag<__half>{}); break;
    case at::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    default: TORCH_CHECK(false, name, ": unsupported dtype ", dtype);
  }
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.const_data_ptr()) : nullptr;
}

template <typename T>
T* mutable_ptr(at::Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

at::Tensor prepare(const at::Tensor& t, at::ScalarType dtype, Layout layout) {
  return t.to(dtype).contiguous(memory_format_of(layout));
}

void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), name, ": every tensor must be on ", like.device());
}

void check_launch(cudaError_t err, const char* name) {
  TORCH_CHECK(err == cudaSuccess, name, ": kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor depthwise_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* name = "pyvl::depthwise_conv2d";
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1, name,
              ": bad shapes");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == x.size(1)), name, ": bad bias shape");
  check_cuda(x, x, name);
  check_cuda(weight, x, name);
  if (bias.has_value()) check_cuda(*bias, x, name);
  const c10::cuda::CUDAGuard guard(x.device());
  const Layout layout = layout_of(x);
  const auto dt = x.scalar_type();
  const auto s = conv2d_shape(x.size(0), x.size(1), x.size(2), x.size(3), weight.size(2), weight.size(3), stride,
                              padding, dilation);
  TORCH_CHECK(s.OH > 0 && s.OW > 0, name, ": empty output");
  at::Tensor xc = prepare(x, dt, layout);
  at::Tensor wc = weight.to(dt).contiguous();
  at::Tensor bc = bias.has_value() ? bias->to(dt).contiguous() : at::Tensor();
  at::Tensor out = at::empty({s.N, s.C, s.OH, s.OW}, xc.options().memory_format(memory_format_of(layout)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_storage(dt, name, [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_launch(cuda::depthwise_conv2d_forward<T>(ptr<T>(xc), ptr<T>(wc), ptr<T>(bc), mutable_ptr<T>(out), s,
                                                   layout, stream),
                 name);
  });
  return out;
}

at::Tensor depthwise_conv2d_backward_input_cuda(const at::Tensor& grad_out, const at::Tensor& weight,
                                                at::IntArrayRef input_size, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* name = "pyvl::depthwise_conv2d_backward_input";
  TORCH_CHECK(grad_out.dim() == 4 && weight.dim() == 4 && input_size.size() == 2, name, ": bad shapes");
  TORCH_CHECK(weight.size(0) == grad_out.size(1) && weight.size(1) == 1, name, ": bad weight shape");
  check_cuda(grad_out, grad_out, name);
  check_cuda(weight, grad_out, name);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const Layout layout = layout_of(grad_out);
  const auto dt = grad_out.scalar_type();
  const auto s = conv2d_shape(grad_out.size(0), grad_out.size(1), input_size[0], input_size[1], weight.size(2),
                              weight.size(3), stride, padding, dilation);
  TORCH_CHECK(s.OH == grad_out.size(2) && s.OW == grad_out.size(3), name, ": grad_out does not match the input size");
  at::Tensor go = prepare(grad_out, dt, layout);
  at::Tensor wc = weight.to(dt).contiguous();
  at::Tensor gx = at::empty({s.N, s.C, s.H, s.W}, go.options().memory_format(memory_format_of(layout)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_storage(dt, name, [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_launch(cuda::depthwise_conv2d_backward_input<T>(ptr<T>(go), ptr<T>(wc), mutable_ptr<T>(gx), s, layout,
                                                          stream),
                 name);
  });
  return gx;
}

at::Tensor depthwise_conv2d_backward_weight_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                 at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                 at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* name = "pyvl::depthwise_conv2d_backward_weight";
  TORCH_CHECK(grad_out.dim() == 4 && x.dim() == 4 && kernel_size.size() == 2, name, ": bad shapes");
  TORCH_CHECK(grad_out.size(0) == x.size(0) && grad_out.size(1) == x.size(1), name,
              ": grad_out and x disagree on N or C");
  check_cuda(x, x, name);
  check_cuda(grad_out, x, name);
  const c10::cuda::CUDAGuard guard(x.device());
  const Layout layout = layout_of(x);
  const auto dt = x.scalar_type();
  const auto s = conv2d_shape(x.size(0), x.size(1), x.size(2), x.size(3), kernel_size[0], kernel_size[1], stride,
                              padding, dilation);
  TORCH_CHECK(s.OH == grad_out.size(2) && s.OW == grad_out.size(3), name, ": grad_out does not match the input size");
  at::Tensor xc = prepare(x, dt, layout);
  at::Tensor go = prepare(grad_out, dt, layout);
  at::Tensor gw = at::empty({s.C, 1, s.KH, s.KW}, xc.options().memory_format(at::MemoryFormat::Contiguous));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_storage(dt, name, [&](auto tag) {
    using T = typename decltype(tag)::type;
    // Scratch for the split reduction, from the caching allocator on this stream; freed when `workspace` goes.
    const size_t bytes = cuda::depthwise_conv2d_backward_weight_workspace_bytes<T>(s, layout);
    at::Tensor workspace = bytes > 0 ? at::empty({static_cast<int64_t>(bytes)}, xc.options().dtype(at::kByte))
                                     : at::Tensor();
    check_launch(cuda::depthwise_conv2d_backward_weight<T>(ptr<T>(go), ptr<T>(xc), mutable_ptr<T>(gw),
                                                           bytes > 0 ? workspace.mutable_data_ptr() : nullptr, s,
                                                           layout, stream),
                 name);
  });
  return gw;
}

at::Tensor dsconv2d_cuda(const at::Tensor& x, const at::Tensor& dw_weight, const std::optional<at::Tensor>& dw_bias,
                         const at::Tensor& pw_weight, const std::optional<at::Tensor>& pw_bias, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t dw_activation,
                         int64_t pw_activation) {
  constexpr const char* name = "pyvl::dsconv2d";
  TORCH_CHECK(x.dim() == 4 && dw_weight.dim() == 4 && pw_weight.dim() == 2 && pw_weight.size(1) == x.size(1) &&
                  dw_weight.size(0) == x.size(1) && dw_weight.size(1) == 1,
              name, ": bad shapes");
  TORCH_CHECK(!dw_bias.has_value() || (dw_bias->dim() == 1 && dw_bias->size(0) == x.size(1)), name,
              ": bad dw_bias shape");
  TORCH_CHECK(!pw_bias.has_value() || (pw_bias->dim() == 1 && pw_bias->size(0) == pw_weight.size(0)), name,
              ": bad pw_bias shape");
  TORCH_CHECK(dw_activation >= 0 && dw_activation <= 2 && pw_activation >= 0 && pw_activation <= 2, name,
              ": activation must be 0 (none), 1 (relu) or 2 (relu6)");
  check_cuda(x, x, name);
  check_cuda(dw_weight, x, name);
  check_cuda(pw_weight, x, name);
  if (dw_bias.has_value()) check_cuda(*dw_bias, x, name);
  if (pw_bias.has_value()) check_cuda(*pw_bias, x, name);
  const c10::cuda::CUDAGuard guard(x.device());
  const Layout layout = layout_of(x);
  const auto dt = x.scalar_type();
  const auto s = conv2d_shape(x.size(0), x.size(1), x.size(2), x.size(3), dw_weight.size(2), dw_weight.size(3),
                              stride, padding, dilation);
  TORCH_CHECK(s.OH > 0 && s.OW > 0, name, ": empty output");
  const int64_t C_out = pw_weight.size(0);
  at::Tensor xc = prepare(x, dt, layout);
  at::Tensor dw = dw_weight.to(dt).contiguous();
  at::Tensor pw = pw_weight.to(dt).contiguous();
  at::Tensor db = dw_bias.has_value() ? dw_bias->to(dt).contiguous() : at::Tensor();
  at::Tensor pb = pw_bias.has_value() ? pw_bias->to(dt).contiguous() : at::Tensor();
  at::Tensor out = at::empty({s.N, C_out, s.OH, s.OW}, xc.options().memory_format(memory_format_of(layout)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_storage(dt, name, [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_launch(cuda::dsconv2d_forward<T>(ptr<T>(xc), ptr<T>(dw), ptr<T>(db), ptr<T>(pw), ptr<T>(pb),
                                           mutable_ptr<T>(out), s, C_out, static_cast<Activation>(dw_activation),
                                           static_cast<Activation>(pw_activation), layout, stream),
                 name);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvl, CUDA, m) {
  m.impl("depthwise_conv2d", &depthwise_conv2d_cuda);
  m.impl("depthwise_conv2d_backward_input", &depthwise_conv2d_backward_input_cuda);
  m.impl("depthwise_conv2d_backward_weight", &depthwise_conv2d_backward_weight_cuda);
  m.impl("dsconv2d", &dsconv2d_cuda);
}

}  // namespace pyvl
#endif  // PYVL_WITH_CUDA
