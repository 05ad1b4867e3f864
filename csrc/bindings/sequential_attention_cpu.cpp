// at::Tensor -> raw-pointer CPU kernels for sequential attention. Argument checking lives in
// pyvl/ops/sequential_attention.py; these TORCH_CHECKs only guard memory safety.
#include <torch/library.h>

#include "bindings/common.h"
#include "cpu/sequential_attention.h"

namespace pyvl {
namespace {

// [B, H, L, E] in the compute dtype, dense, viewed as [B*H, L, E] by the kernels (a copy only when needed).
at::Tensor dense(const at::Tensor& t, at::ScalarType ct) { return t.to(ct).contiguous(); }

// [B, H, L, E] in the compute dtype with a unit stride along E (a copy only when the dtype or that stride differs):
// q, k, v and grad_out are read in place through their strides, so the usual x.view(B, L, H, E).transpose(1, 2)
// costs no copy.
at::Tensor rows_of(const at::Tensor& t, at::ScalarType ct) {
  at::Tensor c = t.to(ct);
  return c.size(3) > 1 && c.stride(3) != 1 ? c.contiguous() : c;
}

template <typename Ptr>
HeadRows<Ptr> head_rows(const at::Tensor& t, Ptr* data) {
  return HeadRows<Ptr>{data, t.size(1), t.stride(0), t.stride(1), t.stride(2)};
}

// A gradient buffer laid out like its input (empty_like keeps a dense permuted layout), so that autograd hands
// the gradient of a transposed view back without a copy.
at::Tensor grad_like(const at::Tensor& t) {
  at::Tensor g = at::empty_like(t);
  return g.size(3) > 1 && g.stride(3) != 1 ? at::empty(t.sizes(), t.options()) : g;
}

AttentionShape attention_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "pyvl::sequential_attention: q, k, v must be 4-D");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == q.size(1) && v.size(1) == q.size(1) &&
                  k.size(3) == q.size(3) && v.size(2) == k.size(2),
              "pyvl::sequential_attention: mismatched q, k, v shapes");
  AttentionShape s{};
  s.B = q.size(0); s.H = q.size(1); s.N = q.size(2); s.M = k.size(2); s.D = q.size(3); s.DV = v.size(3);
  s.scale = scale;
  return s;
}

// The bias in the compute dtype with a unit (or broadcast) key stride, and its view broadcast to [B, H, N, M].
struct PreparedBias {
  at::Tensor tensor;  // keeps the data alive
  int64_t sb = 0, sh = 0, sn = 0, sm = 0;
};

PreparedBias prepare_bias(const std::optional<at::Tensor>& bias, const AttentionShape& s, at::ScalarType ct) {
  PreparedBias p;
  if (!bias.has_value()) return p;
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.dim() == 4, "pyvl::sequential_attention: bias must be 4-D (the op layer adds leading dims)");
  const int64_t full[4] = {s.B, s.H, s.N, s.M};
  for (int d = 0; d < 4; ++d)
    TORCH_CHECK(b.size(d) == 1 || b.size(d) == full[d], "pyvl::sequential_attention: bias does not broadcast");
  at::Tensor t = b.to(ct);
  if (t.size(3) > 1 && t.stride(3) != 1) t = t.contiguous();  // the bias's own size, never [B, H, N, M]
  at::Tensor e = t.expand({s.B, s.H, s.N, s.M});  // a view: stride 0 along broadcast dims
  p.tensor = t;
  p.sb = e.stride(0); p.sh = e.stride(1); p.sn = e.stride(2); p.sm = e.stride(3);
  if (s.B == 1) p.sb = 0;
  if (s.H == 1) p.sh = 0;
  if (s.N == 1) p.sn = 0;
  if (s.M == 1) p.sm = 0;
  return p;
}

template <typename T>
BiasView<T> view_of(const PreparedBias& p) {
  return BiasView<T>{p.tensor.defined() ? p.tensor.const_data_ptr<T>() : nullptr, p.sb, p.sh, p.sn, p.sm};
}

std::tuple<at::Tensor, at::Tensor> sequential_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const std::optional<at::Tensor>& bias,
                                                            double scale, bool deterministic) {
  (void)deterministic;  // the CPU kernels are always deterministic
  const auto s = attention_shape(q, k, v, scale);
  const auto ct = compute_dtype(q.scalar_type());
  at::Tensor qc = rows_of(q, ct), kc = rows_of(k, ct), vc = rows_of(v, ct);
  PreparedBias pb = prepare_bias(bias, s, ct);
  at::Tensor out = at::empty({s.B, s.H, s.N, s.DV}, qc.options());
  at::Tensor lse = at::empty({s.B, s.H, s.N}, qc.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "pyvl::sequential_attention", [&] {
    cpu::sequential_attention_forward<scalar_t>(
        head_rows(qc, qc.const_data_ptr<scalar_t>()), head_rows(kc, kc.const_data_ptr<scalar_t>()),
        head_rows(vc, vc.const_data_ptr<scalar_t>()), view_of<scalar_t>(pb), out.mutable_data_ptr<scalar_t>(),
        lse.mutable_data_ptr<scalar_t>(), s);
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sequential_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& lse, double scale,
    bool bias_requires_grad, bool deterministic) {
  (void)deterministic;
  const auto s = attention_shape(q, k, v, scale);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.size(0) == s.B && out.size(1) == s.H && out.size(2) == s.N &&
                  out.size(3) == s.DV && lse.numel() == s.B * s.H * s.N,
              "pyvl::sequential_attention_backward: grad_out, out or lse do not match q, k, v");
  const auto ct = compute_dtype(q.scalar_type());
  at::Tensor qc = rows_of(q, ct), kc = rows_of(k, ct), vc = rows_of(v, ct);
  at::Tensor go = rows_of(grad_out, ct), oc = dense(out, ct), lc = dense(lse, ct);
  PreparedBias pb = prepare_bias(bias, s, ct);
  at::Tensor gq = grad_like(qc), gk = grad_like(kc), gv = grad_like(vc);
  const bool want_bias = bias.has_value() && bias_requires_grad;
  const int64_t bias_B = want_bias ? bias->size(0) : 1, bias_H = want_bias ? bias->size(1) : 1;
  // The kernel reduces over broadcast batch / head dims; a bias broadcast along queries or keys gets the dense
  // [.., N, M] gradient first and is summed below (key-padding masks are constants in practice).
  at::Tensor gb = want_bias ? at::empty({bias_B, bias_H, s.N, s.M}, qc.options()) : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "pyvl::sequential_attention_backward", [&] {
    cpu::sequential_attention_backward<scalar_t>(
        head_rows(go, go.const_data_ptr<scalar_t>()), head_rows(qc, qc.const_data_ptr<scalar_t>()),
        head_rows(kc, kc.const_data_ptr<scalar_t>()), head_rows(vc, vc.const_data_ptr<scalar_t>()),
        view_of<scalar_t>(pb), oc.const_data_ptr<scalar_t>(), lc.const_data_ptr<scalar_t>(),
        head_rows(gq, gq.mutable_data_ptr<scalar_t>()), head_rows(gk, gk.mutable_data_ptr<scalar_t>()),
        head_rows(gv, gv.mutable_data_ptr<scalar_t>()), want_bias ? gb.mutable_data_ptr<scalar_t>() : nullptr,
        bias_B, bias_H, s);
  });
  if (want_bias) {
    if (bias->size(2) == 1 && s.N > 1) gb = gb.sum(2, true);
    if (bias->size(3) == 1 && s.M > 1) gb = gb.sum(3, true);
    gb = gb.to(bias->scalar_type());
  }
  const auto dt = q.scalar_type();
  return {gq.to(dt), gk.to(dt), gv.to(dt), gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvl, CPU, m) {
  m.impl("sequential_attention", &sequential_attention_cpu);
  m.impl("sequential_attention_backward", &sequential_attention_backward_cpu);
}

}  // namespace pyvl
