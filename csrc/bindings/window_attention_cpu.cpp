// at::Tensor -> raw-pointer CPU kernels for window attention (csrc/cpu/window_attention.cpp).
// pyvl/ops/window_attention.py checks the arguments of the public op; these TORCH_CHECKs guard memory safety for
// direct calls of torch.ops.pyvl.window_attention*. float16 and bfloat16 are computed in float: the inputs are
// upcast here (a copy of q, k, v) and the results rounded once.
#include <torch/library.h>

#include <array>
#include <tuple>

#include "bindings/common.h"
#include "cpu/window_attention.h"

namespace pyvl {
namespace {

// A (B, [T,] H, W, heads, d) tensor as (B, T, H, W, heads, d) in the compute dtype with a unit stride on d.
at::Tensor tokens(const at::Tensor& t, at::ScalarType ct) {
  at::Tensor r = t.to(ct);
  if (r.dim() == 5) r = r.unsqueeze(1);
  if (r.stride(5) != 1 && r.size(5) > 1) r = r.contiguous();
  return r;
}

TokenStrides strides_of(const at::Tensor& t6) {
  return TokenStrides{t6.stride(0), t6.stride(1), t6.stride(2), t6.stride(3), t6.stride(4)};
}

at::Tensor small(const std::optional<at::Tensor>& t, at::ScalarType ct) {
  return t.has_value() ? t->to(ct).contiguous() : at::Tensor();
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

struct Prepared {
  WindowAttentionShape shape;
  at::ScalarType ct;
  at::Tensor q, k, v, table, bias, logit_scale, pad_k, pad_v;
};

Prepared prepare(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::IntArrayRef window,
                 at::IntArrayRef shift, const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& bias,
                 const std::optional<at::Tensor>& logit_scale, std::optional<double> scale,
                 const std::optional<at::Tensor>& pad_k, const std::optional<at::Tensor>& pad_v, bool pad_first,
                 double mask_value) {
  const int64_t nd = q.dim() - 3;
  TORCH_CHECK(nd == 2 || nd == 3, op, ": q must be (B, H, W, heads, d) or (B, T, H, W, heads, d)");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op, ": k and v must have q's shape");
  TORCH_CHECK(static_cast<int64_t>(window.size()) == nd && static_cast<int64_t>(shift.size()) == nd, op,
              ": window and shift need one entry per spatial dim");
  TORCH_CHECK(q.numel() > 0, op, ": q must not be empty");
  Prepared p;
  p.ct = compute_dtype(q.scalar_type());
  p.q = tokens(q, p.ct);
  p.k = tokens(k, p.ct);
  p.v = tokens(v, p.ct);
  WindowAttentionShape& s = p.shape;
  s.B = p.q.size(0);
  s.T = p.q.size(1);
  s.H = p.q.size(2);
  s.W = p.q.size(3);
  s.heads = p.q.size(4);
  s.d = p.q.size(5);
  int64_t N = 1, rows = 1;
  for (int64_t i = 0; i < 3; ++i) {
    const int64_t j = i - (3 - nd);
    s.window[i] = j < 0 ? 1 : window[j];
    s.shift[i] = j < 0 ? 0 : shift[j];
    TORCH_CHECK(s.window[i] >= 1 && s.shift[i] >= 0 && s.shift[i] < s.window[i], op,
                ": need window >= 1 and 0 <= shift < window");
    N *= s.window[i];
    rows *= 2 * s.window[i] - 1;
  }
  s.pad_first = pad_first;
  s.mask_value = mask_value;
  TORCH_CHECK(logit_scale.has_value() || scale.has_value(), op, ": scale is required without logit_scale");
  s.scale = scale.has_value() ? *scale : 0.0;
  p.table = small(table, p.ct);
  p.bias = small(bias, p.ct);
  p.logit_scale = small(logit_scale, p.ct);
  p.pad_k = small(pad_k, p.ct);
  p.pad_v = small(pad_v, p.ct);
  TORCH_CHECK(!(p.table.defined() && p.bias.defined()), op, ": rel_bias_table and rel_bias are exclusive");
  TORCH_CHECK(!p.table.defined() || p.table.sizes() == at::IntArrayRef({rows, s.heads}), op,
              ": rel_bias_table must be [prod(2w - 1), heads]");
  TORCH_CHECK(!p.bias.defined() || p.bias.sizes() == at::IntArrayRef({s.heads, N, N}), op,
              ": rel_bias must be [heads, N, N]");
  TORCH_CHECK(!p.logit_scale.defined() || p.logit_scale.numel() == s.heads, op, ": logit_scale must have heads elements");
  for (const at::Tensor* t : {&p.pad_k, &p.pad_v})
    TORCH_CHECK(!t->defined() || t->sizes() == at::IntArrayRef({s.heads, s.d}), op, ": pad_k / pad_v must be [heads, d]");
  return p;
}

template <typename T>
WindowAttentionInputs<T> inputs_of(const Prepared& p) {
  return WindowAttentionInputs<T>{ptr<T>(p.q),     strides_of(p.q),     ptr<T>(p.k),           strides_of(p.k),
                                  ptr<T>(p.v),     strides_of(p.v),     ptr<T>(p.table),       ptr<T>(p.bias),
                                  ptr<T>(p.logit_scale), ptr<T>(p.pad_k), ptr<T>(p.pad_v)};
}

std::tuple<at::Tensor, at::Tensor> window_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::IntArrayRef window, at::IntArrayRef shift,
    const std::optional<at::Tensor>& rel_bias_table, const std::optional<at::Tensor>& rel_bias,
    const std::optional<at::Tensor>& logit_scale, std::optional<double> scale, const std::optional<at::Tensor>& pad_k,
    const std::optional<at::Tensor>& pad_v, bool pad_first, double mask_value) {
  const Prepared p = prepare("pyvl::window_attention", q, k, v, window, shift, rel_bias_table, rel_bias, logit_scale,
                             scale, pad_k, pad_v, pad_first, mask_value);
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(p.ct));
  at::Tensor lse = at::empty(q.sizes().slice(0, q.dim() - 1), q.options().dtype(p.ct));
  AT_DISPATCH_FLOATING_TYPES(p.ct, "pyvl::window_attention", [&] {
    cpu::window_attention_forward<scalar_t>(p.shape, inputs_of<scalar_t>(p), out.mutable_data_ptr<scalar_t>(),
                                            lse.mutable_data_ptr<scalar_t>());
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
window_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& out, const at::Tensor& lse, at::IntArrayRef window,
                              at::IntArrayRef shift, const std::optional<at::Tensor>& rel_bias_table,
                              const std::optional<at::Tensor>& rel_bias, const std::optional<at::Tensor>& logit_scale,
                              std::optional<double> scale, const std::optional<at::Tensor>& pad_k,
                              const std::optional<at::Tensor>& pad_v, bool pad_first, double mask_value,
                              c10::List<bool> needs) {
  const char* op = "pyvl::window_attention_backward";
  const Prepared p = prepare(op, q, k, v, window, shift, rel_bias_table, rel_bias, logit_scale, scale, pad_k, pad_v,
                             pad_first, mask_value);
  TORCH_CHECK(needs.size() == 8, op, ": needs must have 8 flags");
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op, ": grad_out and out must have q's shape");
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, q.dim() - 1), op, ": lse must have q's shape without d");
  // out and lse are part of the schema (a kernel may use them); this one recomputes the probabilities from q and k
  // (see csrc/cpu/window_attention.h).
  const at::Tensor go = tokens(grad_out, p.ct);
  // The gradients, in the order of the schema, with the input each belongs to.
  const std::array<const at::Tensor*, 8> of = {&p.q, &p.k, &p.v, &p.table, &p.bias, &p.logit_scale, &p.pad_k,
                                               &p.pad_v};
  std::array<at::Tensor, 8> g;
  for (size_t i = 0; i < 8; ++i) {
    if (needs[i] && of[i]->defined()) {
      const auto sizes = i < 3 ? q.sizes() : of[i]->sizes();
      g[i] = at::empty(sizes, q.options().dtype(p.ct));
    }
  }
  AT_DISPATCH_FLOATING_TYPES(p.ct, "pyvl::window_attention_backward", [&] {
    auto mut = [&](size_t i) { return g[i].defined() ? g[i].mutable_data_ptr<scalar_t>() : nullptr; };
    const WindowAttentionGrads<scalar_t> grads{mut(0), mut(1), mut(2), mut(3), mut(4), mut(5), mut(6), mut(7)};
    cpu::window_attention_backward<scalar_t>(p.shape, inputs_of<scalar_t>(p), go.const_data_ptr<scalar_t>(),
                                             strides_of(go), grads);
  });
  auto result = [&](size_t i) { return g[i].defined() ? g[i].to(q.scalar_type()) : at::empty({0}, q.options()); };
  return {result(0), result(1), result(2), result(3), result(4), result(5), result(6), result(7)};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvl, CPU, m) {
  m.impl("window_attention", &window_attention_cpu);
  m.impl("window_attention_backward", &window_attention_backward_cpu);
}

}  // namespace pyvl
