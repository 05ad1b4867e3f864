// Checks the sequential-attention kernels (forward and backward, float and double, every bias broadcast form)
// against naive double loops written here that materialize the scores, independent of the kernels' tiles and
// online softmax. Shapes cross the kernels' query (48) and key (96) blocks. Exits non-zero on the first mismatch.
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "cpu/sequential_attention.h"
#include "tests/check.h"

using pyvl::AttentionShape;
using pyvl::BiasView;

namespace {

using pyvl_test::close;

struct Case {
  int64_t B, H, N, M, D, DV;
  int64_t bias_B, bias_H, bias_N, bias_M;  // 0: no bias; else each 1 or the full size
};

struct Result {
  std::vector<double> out, lse, gq, gk, gv, gbias;  // gbias dense [bias_B, bias_H, N, M]
};

// out = softmax(scale * q k^T + bias) v row by row; gradients by the textbook softmax backward.
Result reference(const Case& c, double scale, const std::vector<double>& q, const std::vector<double>& k,
                 const std::vector<double>& v, const std::vector<double>& bias, const std::vector<double>& go) {
  Result r;
  r.out.assign(c.B * c.H * c.N * c.DV, 0.0);
  r.lse.assign(c.B * c.H * c.N, 0.0);
  r.gq.assign(q.size(), 0.0);
  r.gk.assign(k.size(), 0.0);
  r.gv.assign(v.size(), 0.0);
  const int64_t gB = c.bias_B ? c.bias_B : 1, gH = c.bias_H ? c.bias_H : 1;
  r.gbias.assign(gB * gH * c.N * c.M, 0.0);
  std::vector<double> p(c.M), dp(c.M);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h) {
      const int64_t bh = b * c.H + h;
      for (int64_t i = 0; i < c.N; ++i) {
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < c.M; ++j) {
          double s = 0;
          for (int64_t e = 0; e < c.D; ++e) s += q[(bh * c.N + i) * c.D + e] * k[(bh * c.M + j) * c.D + e];
          s *= scale;
          if (c.bias_B) {
            const int64_t bi = ((c.bias_B > 1 ? b : 0) * c.bias_H + (c.bias_H > 1 ? h : 0)) * c.bias_N * c.bias_M +
                               (c.bias_N > 1 ? i : 0) * c.bias_M + (c.bias_M > 1 ? j : 0);
            s += bias[bi];
          }
          p[j] = s;
          mx = std::max(mx, s);
        }
        double sum = 0;
        for (int64_t j = 0; j < c.M; ++j) sum += (p[j] = std::exp(p[j] - mx));
        r.lse[bh * c.N + i] = mx + std::log(sum);
        for (int64_t j = 0; j < c.M; ++j) p[j] /= sum;
        double delta = 0;
        for (int64_t e = 0; e < c.DV; ++e) {
          double o = 0;
          for (int64_t j = 0; j < c.M; ++j) o += p[j] * v[(bh * c.M + j) * c.DV + e];
          r.out[(bh * c.N + i) * c.DV + e] = o;
          delta += o * go[(bh * c.N + i) * c.DV + e];
        }
        for (int64_t j = 0; j < c.M; ++j) {
          double d = 0;
          for (int64_t e = 0; e < c.DV; ++e) {
            d += go[(bh * c.N + i) * c.DV + e] * v[(bh * c.M + j) * c.DV + e];
            r.gv[(bh * c.M + j) * c.DV + e] += p[j] * go[(bh * c.N + i) * c.DV + e];
          }
          const double ds = p[j] * (d - delta);
          for (int64_t e = 0; e < c.D; ++e) {
            r.gq[(bh * c.N + i) * c.D + e] += scale * ds * k[(bh * c.M + j) * c.D + e];
            r.gk[(bh * c.M + j) * c.D + e] += scale * ds * q[(bh * c.N + i) * c.D + e];
          }
          r.gbias[(((gB > 1 ? b : 0) * gH + (gH > 1 ? h : 0)) * c.N + i) * c.M + j] += ds;
        }
      }
    }
  return r;
}

template <typename T>
bool check(const Case& c, std::mt19937& rng) {
  std::normal_distribution<double> nd;
  auto fill = [&](int64_t n) {
    std::vector<double> x(n);
    for (auto& e : x) e = nd(rng);
    return x;
  };
  const double scale = 1.0 / std::sqrt(double(c.D));
  const auto q = fill(c.B * c.H * c.N * c.D), k = fill(c.B * c.H * c.M * c.D), v = fill(c.B * c.H * c.M * c.DV);
  const auto go = fill(c.B * c.H * c.N * c.DV);
  const auto bias = c.bias_B ? fill(c.bias_B * c.bias_H * c.bias_N * c.bias_M) : std::vector<double>();
  const Result want = reference(c, scale, q, k, v, bias, go);

  auto cast = [](const std::vector<double>& x) { return std::vector<T>(x.begin(), x.end()); };
  const auto qt = cast(q), kt = cast(k), vt = cast(v), got_go = cast(go), bt = cast(bias);
  BiasView<T> bv{nullptr, 0, 0, 0, 0};
  if (c.bias_B) {  // dense [bias_B, bias_H, bias_N, bias_M], stride 0 along the broadcast dims
    bv.data = bt.data();
    bv.sm = c.bias_M > 1 ? 1 : 0;
    bv.sn = c.bias_N > 1 ? c.bias_M : 0;
    bv.sh = c.bias_H > 1 ? c.bias_N * c.bias_M : 0;
    bv.sb = c.bias_B > 1 ? c.bias_H * c.bias_N * c.bias_M : 0;
  }
  const AttentionShape s{c.B, c.H, c.N, c.M, c.D, c.DV, scale};
  // Outputs start as NaN so an element the kernels forget to write fails the comparison.
  std::vector<T> out(want.out.size(), T(NAN)), lse(want.lse.size(), T(NAN)), gq(q.size(), T(NAN)),
      gk(k.size(), T(NAN)), gv(v.size(), T(NAN)), gb(want.gbias.size(), T(NAN));
  using pyvl::HeadRows;
  const auto rows = [&](const std::vector<T>& x, int64_t L, int64_t E) {
    return HeadRows<const T>::dense(x.data(), c.H, L, E);
  };
  const auto grads = [&](std::vector<T>& x, int64_t L, int64_t E) { return HeadRows<T>::dense(x.data(), c.H, L, E); };
  pyvl::cpu::sequential_attention_forward<T>(rows(qt, c.N, c.D), rows(kt, c.M, c.D), rows(vt, c.M, c.DV), bv,
                                             out.data(), lse.data(), s);
  const int64_t gB = c.bias_B ? c.bias_B : 1, gH = c.bias_H ? c.bias_H : 1;
  // With a bias broadcast along N or M the kernel's gradient is the dense [.., N, M] one, as the reference's.
  pyvl::cpu::sequential_attention_backward<T>(rows(got_go, c.N, c.DV), rows(qt, c.N, c.D), rows(kt, c.M, c.D),
                                              rows(vt, c.M, c.DV), bv, out.data(), lse.data(), grads(gq, c.N, c.D),
                                              grads(gk, c.M, c.D), grads(gv, c.M, c.DV),
                                              c.bias_B ? gb.data() : nullptr, gB, gH, s);
  const double tol = sizeof(T) == 4 ? 3e-5 : 1e-11;
  return close("out", out, want.out, tol) && close("lse", lse, want.lse, tol) && close("grad_q", gq, want.gq, tol) &&
         close("grad_k", gk, want.gk, tol) && close("grad_v", gv, want.gv, tol) &&
         (!c.bias_B || close("grad_bias", gb, want.gbias, tol));
}

}  // namespace

int main() {
  const Case cases[] = {
      {1, 1, 1, 1, 1, 1, 0, 0, 0, 0},            // the smallest problem
      {2, 3, 50, 100, 7, 5, 2, 3, 50, 100},      // past one query and one key block, per-head bias
      {1, 2, 97, 193, 32, 16, 1, 1, 97, 193},    // shared bias, several blocks, partial last blocks
      {2, 2, 48, 96, 16, 17, 1, 2, 48, 96},      // exact block multiples, bias shared over the batch
      {3, 1, 13, 30, 5, 3, 3, 1, 1, 30},         // key-padding bias [B, 1, 1, M]
      {2, 2, 20, 9, 3, 8, 0, 0, 0, 0},           // no bias, M below one SIMD width
  };
  std::mt19937 rng(1234);
  int failures = 0;
  for (const auto& c : cases) {
    const bool ok = check<float>(c, rng) && check<double>(c, rng);
    if (!ok) {
      ++failures;
      std::printf("FAIL B=%ld H=%ld N=%ld M=%ld D=%ld DV=%ld bias=[%ld,%ld,%ld,%ld]\n", long(c.B), long(c.H), long(c.N),
                  long(c.M), long(c.D), long(c.DV), long(c.bias_B), long(c.bias_H), long(c.bias_N), long(c.bias_M));
    }
  }
  std::printf("%s: %d failing cases\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}
