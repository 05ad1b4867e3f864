// at::Tensor -> raw-pointer CPU kernels for depthwise convolution and the fused block.
// Argument checking lives in pyvl/ops/; these TORCH_CHECKs only guard memory safety.
#include <torch/library.h>

#include "bindings/common.h"

namespace pyvl {
namespace {

at::Tensor prepare(const at::Tensor& t, at::ScalarType dtype, Layout layout) {
  return t.to(dtype).contiguous(memory_format_of(layout));
}

at::Tensor depthwise_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1,
              "pyvl::depthwise_conv2d: bad shapes");
  const Layout layout = layout_of(x);
  const auto ct = compute_dtype(x.scalar_type());
  const auto s = conv2d_shape(x.size(0), x.size(1), x.size(2), x.size(3), weight.size(2), weight.size(3), stride,
                              padding, dilation);
  TORCH_CHECK(s.OH > 0 && s.OW > 0, "pyvl::depthwise_conv2d: empty output");
  at::Tensor xc = prepare(x, ct, layout);
  at::Tensor wc = weight.to(ct).contiguous();
  at::Tensor bc = bias.has_value() ? bias->to(ct).contiguous() : at::Tensor();
  at::Tensor out = at::empty({s.N, s.C, s.OH, s.OW}, xc.options().memory_format(memory_format_of(layout)));
  AT_DISPATCH_FLOATING_TYPES(ct, "pyvl::depthwise_conv2d", [&] {
    cpu::depthwise_conv2d_forward<scalar_t>(xc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
                                            bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr,
                                            out.mutable_data_ptr<scalar_t>(), s, layout);
  });
  return out.to(x.scalar_type());
}

at::Tensor depthwise_conv2d_backward_input_cpu(const at::Tensor& grad_out, const at::Tensor& weight,
                                               at::IntArrayRef input_size, at::IntArrayRef stride,
                                               at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(grad_out.dim() == 4 && weight.dim() == 4 && input_size.size() == 2, "bad shapes");
  const Layout layout = layout_of(grad_out);
  const auto ct = compute_dtype(grad_out.scalar_type());
  const auto s = conv2d_shape(grad_out.size(0), grad_out.size(1), input_size[0], input_size[1], weight.size(2),
                              weight.size(3), stride, padding, dilation);
  TORCH_CHECK(s.OH == grad_out.size(2) && s.OW == grad_out.size(3), "pyvl::depthwise_conv2d_backward_input: "
              "grad_out does not match the input size");
  at::Tensor go = prepare(grad_out, ct, layout);
  at::Tensor wc = weight.to(ct).contiguous();
  at::Tensor gx = at::empty({s.N, s.C, s.H, s.W}, go.options().memory_format(memory_format_of(layout)));
  AT_DISPATCH_FLOATING_TYPES(ct, "pyvl::depthwise_conv2d_backward_input", [&] {
    cpu::depthwise_conv2d_backward_input<scalar_t>(go.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
                                                   gx.mutable_data_ptr<scalar_t>(), s, layout);
  });
  return gx.to(grad_out.scalar_type());
}

at::Tensor depthwise_conv2d_backward_weight_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(grad_out.dim() == 4 && x.dim() == 4 && kernel_size.size() == 2, "bad shapes");
  const Layout layout = layout_of(x);
  const auto ct = compute_dtype(x.scalar_type());
  const auto s = conv2d_shape(x.size(0), x.size(1), x.size(2), x.size(3), kernel_size[0], kernel_size[1], stride,
                              padding, dilation);
  TORCH_CHECK(s.OH == grad_out.size(2) && s.OW == grad_out.size(3), "pyvl::depthwise_conv2d_backward_weight: "
              "grad_out does not match the input size");
  at::Tensor xc = prepare(x, ct, layout);
  at::Tensor go = prepare(grad_out, ct, layout);
  at::Tensor gw = at::empty({s.C, 1, s.KH, s.KW}, xc.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES(ct, "pyvl::depthwise_conv2d_backward_weight", [&] {
    cpu::depthwise_conv2d_backward_weight<scalar_t>(go.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
                                                    gw.mutable_data_ptr<scalar_t>(), s, layout);
  });
  return gw.to(x.scalar_type());
}

at::Tensor dsconv2d_cpu(const at::Tensor& x, const at::Tensor& dw_weight, const std::optional<at::Tensor>& dw_bias,
                        const at::Tensor& pw_weight, const std::optional<at::Tensor>& pw_bias, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t dw_activation,
                        int64_t pw_activation) {
  TORCH_CHECK(x.dim() == 4 && dw_weight.dim() == 4 && pw_weight.dim() == 2 && pw_weight.size(1) == x.size(1),
              "pyvl::dsconv2d: bad shapes");
  TORCH_CHECK(dw_activation >= 0 && dw_activation <= 2 && pw_activation >= 0 && pw_activation <= 2,
              "pyvl::dsconv2d: activation must be 0 (none), 1 (relu) or 2 (relu6)");
  const Layout layout = layout_of(x);
  const auto ct = compute_dtype(x.scalar_type());
  const auto s = conv2d_shape(x.size(0), x.size(1), x.size(2), x.size(3), dw_weight.size(2), dw_weight.size(3),
                              stride, padding, dilation);
  TORCH_CHECK(s.OH > 0 && s.OW > 0, "pyvl::dsconv2d: empty output");
  const int64_t C_out = pw_weight.size(0);
  at::Tensor xc = prepare(x, ct, layout);
  at::Tensor dw = dw_weight.to(ct).contiguous();
  at::Tensor pw = pw_weight.to(ct).contiguous();
  at::Tensor db = dw_bias.has_value() ? dw_bias->to(ct).contiguous() : at::Tensor();
  at::Tensor pb = pw_bias.has_value() ? pw_bias->to(ct).contiguous() : at::Tensor();
  at::Tensor out = at::empty({s.N, C_out, s.OH, s.OW}, xc.options().memory_format(memory_format_of(layout)));
  AT_DISPATCH_FLOATING_TYPES(ct, "pyvl::dsconv2d", [&] {
    cpu::dsconv2d_forward<scalar_t>(xc.const_data_ptr<scalar_t>(), dw.const_data_ptr<scalar_t>(),
                                    db.defined() ? db.const_data_ptr<scalar_t>() : nullptr,
                                    pw.const_data_ptr<scalar_t>(), pb.defined() ? pb.const_data_ptr<scalar_t>() : nullptr,
                                    out.mutable_data_ptr<scalar_t>(), s, C_out, static_cast<Activation>(dw_activation),
                                    static_cast<Activation>(pw_activation), layout);
  });
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvl, CPU, m) {
  m.impl("depthwise_conv2d", &depthwise_conv2d_cpu);
  m.impl("depthwise_conv2d_backward_input", &depthwise_conv2d_backward_input_cpu);
  m.impl("depthwise_conv2d_backward_weight", &depthwise_conv2d_backward_weight_cpu);
  m.impl("dsconv2d", &dsconv2d_cpu);
}

}  // namespace pyvl
