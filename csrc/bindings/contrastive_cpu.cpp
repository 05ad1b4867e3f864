// at::Tensor -> raw-pointer CPU kernels for the similarity logits and the contrastive statistics.
// Argument checking lives in pyvl/ops/contrastive.py; these TORCH_CHECKs only guard memory safety.
#include <torch/library.h>

#include "bindings/common.h"
#include "cpu/contrastive.h"
#include "cpu/similarity.h"

namespace pyvl {
namespace {

double scalar_of(const at::Tensor& t) {
  TORCH_CHECK(t.numel() == 1, "pyvl: logit_scale / logit_bias must have one element");
  return t.item<double>();
}

// a [B, N, d], b [B, M, d]: rows dense in the compute dtype; a batch stride of 0 (a broadcast batch) is kept.
at::Tensor rows_dense(const at::Tensor& t, at::ScalarType ct) {
  at::Tensor r = t.to(ct);
  if (r.stride(2) == 1 && r.stride(1) == r.size(2)) return r;
  if (r.stride(0) == 0) return r.select(0, 0).contiguous().unsqueeze(0).expand(r.sizes());
  return r.contiguous();
}

at::Tensor similarity_logits_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                                 const std::optional<at::Tensor>& bias, bool normalize) {
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(2) == b.size(2),
              "pyvl::similarity_logits: bad shapes");
  const auto ct = compute_dtype(a.scalar_type());
  at::Tensor ac = rows_dense(a, ct), bc = rows_dense(b, ct);
  const int64_t B = a.size(0), N = a.size(1), M = b.size(1), d = a.size(2);
  at::Tensor out = at::empty({B, N, M}, ac.options().memory_format(at::MemoryFormat::Contiguous));
  const double s = scalar_of(scale), bi = bias.has_value() ? scalar_of(*bias) : 0.0;
  AT_DISPATCH_FLOATING_TYPES(ct, "pyvl::similarity_logits", [&] {
    cpu::similarity_logits_forward<scalar_t>(ac.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(),
                                             out.mutable_data_ptr<scalar_t>(), B, N, M, d,
                                             B > 1 ? ac.stride(0) : 0, B > 1 ? bc.stride(0) : 0,
                                             static_cast<scalar_t>(s), static_cast<scalar_t>(bi), normalize, 1e-12);
  });
  return out.to(a.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_stats_cpu(const at::Tensor& x, const at::Tensor& y,
                                                                     const at::Tensor& logit_scale,
                                                                     const std::optional<at::Tensor>& logit_bias,
                                                                     int64_t kind, int64_t diag_offset) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(1) == y.size(1), "pyvl::contrastive_stats: bad shapes");
  TORCH_CHECK(kind == 0 || kind == 1, "pyvl::contrastive_stats: kind must be 0 (softmax) or 1 (sigmoid)");
  const auto ct = compute_dtype(x.scalar_type());
  at::Tensor xc = x.to(ct).contiguous(), yc = y.to(ct).contiguous();
  const int64_t n = x.size(0), m = y.size(0), d = x.size(1);
  at::Tensor row = at::empty({n}, xc.options());
  at::Tensor col = at::empty({kind == 0 ? m : 0}, xc.options());
  at::Tensor diag = at::empty({n}, xc.options());
  const double s = scalar_of(logit_scale), b = logit_bias.has_value() ? scalar_of(*logit_bias) : 0.0;
  AT_DISPATCH_FLOATING_TYPES(ct, "pyvl::contrastive_stats", [&] {
    cpu::contrastive_stats_forward<scalar_t>(xc.const_data_ptr<scalar_t>(), yc.const_data_ptr<scalar_t>(), n, m, d,
                                             static_cast<scalar_t>(s), static_cast<scalar_t>(b),
                                             static_cast<cpu::ContrastiveKind>(kind), diag_offset,
                                             row.mutable_data_ptr<scalar_t>(),
                                             kind == 0 ? col.mutable_data_ptr<scalar_t>() : nullptr,
                                             diag.mutable_data_ptr<scalar_t>());
  });
  return {row, col, diag};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_stats_backward_cpu(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& grad_diag, const at::Tensor& x,
    const at::Tensor& y, const at::Tensor& logit_scale, const std::optional<at::Tensor>& logit_bias,
    const at::Tensor& row, const at::Tensor& col, int64_t kind, int64_t diag_offset) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(1) == y.size(1), "pyvl::contrastive_stats_backward: bad shapes");
  const int64_t n = x.size(0), m = y.size(0), d = x.size(1);
  TORCH_CHECK(kind == 0 || kind == 1, "pyvl::contrastive_stats_backward: kind must be 0 or 1");
  TORCH_CHECK(grad_row.numel() == n && row.numel() == n && grad_diag.numel() == n,
              "pyvl::contrastive_stats_backward: row sizes");
  TORCH_CHECK(kind == 1 || (grad_col.numel() == m && col.numel() == m),
              "pyvl::contrastive_stats_backward: column sizes");
  const auto ct = compute_dtype(x.scalar_type());
  at::Tensor xc = x.to(ct).contiguous(), yc = y.to(ct).contiguous();
  at::Tensor gr = grad_row.to(ct).contiguous(), rc = row.to(ct).contiguous();
  at::Tensor gc = grad_col.to(ct).contiguous(), cc = col.to(ct).contiguous();
  at::Tensor gd = grad_diag.to(ct).contiguous();
  at::Tensor gx = at::empty({n, d}, xc.options()), gy = at::empty({m, d}, xc.options());
  const double s = scalar_of(logit_scale), b = logit_bias.has_value() ? scalar_of(*logit_bias) : 0.0;
  double g_scale = 0, g_bias = 0;
  AT_DISPATCH_FLOATING_TYPES(ct, "pyvl::contrastive_stats_backward", [&] {
    cpu::contrastive_stats_backward<scalar_t>(
        xc.const_data_ptr<scalar_t>(), yc.const_data_ptr<scalar_t>(), n, m, d, static_cast<scalar_t>(s),
        static_cast<scalar_t>(b), static_cast<cpu::ContrastiveKind>(kind), diag_offset, rc.const_data_ptr<scalar_t>(),
        kind == 0 ? cc.const_data_ptr<scalar_t>() : nullptr, gr.const_data_ptr<scalar_t>(),
        kind == 0 ? gc.const_data_ptr<scalar_t>() : nullptr, gd.const_data_ptr<scalar_t>(),
        gx.mutable_data_ptr<scalar_t>(),
        gy.mutable_data_ptr<scalar_t>(), &g_scale, &g_bias);
  });
  at::Tensor gs = at::full({}, g_scale, logit_scale.options());
  at::Tensor gb = logit_bias.has_value() ? at::full({}, g_bias, logit_bias->options()) : at::empty({0}, x.options());
  return {gx.to(x.scalar_type()), gy.to(y.scalar_type()), gs.reshape(logit_scale.sizes()),
          logit_bias.has_value() ? gb.reshape(logit_bias->sizes()) : gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvl, CPU, m) {
  m.impl("similarity_logits", &similarity_logits_cpu);
  m.impl("contrastive_stats", &contrastive_stats_cpu);
  m.impl("contrastive_stats_backward", &contrastive_stats_backward_cpu);
}

}  // namespace pyvl
