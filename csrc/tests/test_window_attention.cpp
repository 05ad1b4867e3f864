// Checks the window-attention kernels (forward and backward, float and double) against a naive loop written here:
// every grid position of the padded, rolled window grid visits the keys of its window, with the geometry of
// pyvl/ops/window_attention.py spelled out token by token (no tables shared with the kernel). Covers 2D and 3D,
// shifts, sizes not divisible by the window, both padding orders, pad_kv, the bias table, a dense bias, a -inf
// mask, strided (qkv-interleaved) inputs. Exits non-zero on the first failing case.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/window_attention.h"
#include "tests/check.h"

using pyvl::TokenStrides;
using pyvl::WindowAttentionShape;

namespace {

using pyvl_test::close;

struct Case {
  int64_t B, T, H, W, heads, d;
  int64_t window[3], shift[3];
  bool pad_first;
  double mask_value;
  int bias;  // 0 none, 1 table, 2 dense
  bool pad_kv;
};

struct Naive {
  std::vector<double> out, dq, dk, dv, dtable, dbias, dpk, dpv;
};

// Inputs are stored interleaved as one (B, T, H, W, 3, heads, d) tensor, like a qkv projection output.
Naive naive(const Case& c, const std::vector<double>& qkv, const std::vector<double>& table,
            const std::vector<double>& dense, const std::vector<double>& pk, const std::vector<double>& pv,
            const std::vector<double>& go) {
  const int64_t S[3] = {c.T, c.H, c.W};
  int64_t Sp[3], N = 1, mult[3] = {0, 0, 1};
  for (int i = 0; i < 3; ++i) {
    Sp[i] = (S[i] + c.window[i] - 1) / c.window[i] * c.window[i];
    N *= c.window[i];
  }
  mult[1] = 2 * c.window[2] - 1;
  mult[0] = mult[1] * (2 * c.window[1] - 1);
  const int64_t tokens = c.B * c.T * c.H * c.W, hd = c.heads * c.d;
  Naive r;
  r.out.assign(tokens * hd, 0);
  r.dq.assign(tokens * hd, 0);
  r.dk.assign(tokens * hd, 0);
  r.dv.assign(tokens * hd, 0);
  r.dtable.assign(table.size(), 0);
  r.dbias.assign(dense.size(), 0);
  r.dpk.assign(hd, 0);
  r.dpv.assign(hd, 0);
  const double scale = 1.0 / std::sqrt(double(c.d));
  // The token at grid position g (per dim), or -1.
  auto token = [&](const int64_t* g) -> int64_t {
    int64_t t[3];
    for (int i = 0; i < 3; ++i) {
      const int64_t s = c.shift[i];
      if (c.pad_first) {
        const int64_t p = (g[i] + s) % Sp[i];
        if (p >= S[i]) return -1;
        t[i] = p;
      } else {
        if (g[i] >= S[i]) return -1;
        t[i] = (g[i] + s) % S[i];
      }
    }
    return (t[0] * c.H + t[1]) * c.W + t[2];
  };
  auto label = [&](const int64_t* g, int i) {
    const int64_t w = c.window[i], s = c.shift[i];
    return s == 0 ? 0 : (g[i] < Sp[i] - w ? 0 : (g[i] < Sp[i] - s ? 1 : 2));
  };
  auto at = [&](int64_t b, int64_t tok, int which, int64_t h) {  // offset in qkv
    return (((b * c.T * c.H * c.W + tok) * 3 + which) * c.heads + h) * c.d;
  };
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.heads; ++h)
      for (int64_t g0 = 0; g0 < Sp[0]; ++g0)
        for (int64_t g1 = 0; g1 < Sp[1]; ++g1)
          for (int64_t g2 = 0; g2 < Sp[2]; ++g2) {
            const int64_t gi[3] = {g0, g1, g2};
            const int64_t ti = token(gi);
            if (ti < 0) continue;
            std::vector<int64_t> keys;  // grid positions of the window's keys, flattened per dim
            std::vector<double> logits, prob;
            int64_t start[3], ci[3];
            for (int i = 0; i < 3; ++i) {
              start[i] = gi[i] / c.window[i] * c.window[i];
              ci[i] = gi[i] - start[i];
            }
            const double* q = &qkv[at(b, ti, 0, h)];
            std::vector<const double*> krow, vrow;
            std::vector<int64_t> ktok, kidx, kflat;
            for (int64_t a0 = 0; a0 < c.window[0]; ++a0)
              for (int64_t a1 = 0; a1 < c.window[1]; ++a1)
                for (int64_t a2 = 0; a2 < c.window[2]; ++a2) {
                  const int64_t gj[3] = {start[0] + a0, start[1] + a1, start[2] + a2};
                  const int64_t tj = token(gj);
                  const double* k = tj >= 0 ? &qkv[at(b, tj, 1, h)] : &pk[h * c.d];
                  const double* v = tj >= 0 ? &qkv[at(b, tj, 2, h)] : &pv[h * c.d];
                  double s = 0;
                  for (int64_t e = 0; e < c.d; ++e) s += q[e] * scale * k[e];
                  const int64_t cj[3] = {a0, a1, a2};
                  int64_t idx = 0, fi = 0, fj = 0;
                  for (int i = 0; i < 3; ++i) {
                    idx += (ci[i] - cj[i] + c.window[i] - 1) * mult[i];
                    fi = fi * c.window[i] + ci[i];
                    fj = fj * c.window[i] + cj[i];
                  }
                  const int64_t di = (h * N + fi) * N + fj;
                  if (c.bias == 1) s += table[idx * c.heads + h];
                  if (c.bias == 2) s += dense[di];
                  bool differ = false;
                  for (int i = 0; i < 3; ++i) differ = differ || label(gi, i) != label(gj, i);
                  if (differ) s += c.mask_value;
                  logits.push_back(s);
                  krow.push_back(k);
                  vrow.push_back(v);
                  ktok.push_back(tj);
                  kidx.push_back(idx);
                  kflat.push_back(di);
                }
            double mx = -INFINITY, sum = 0;
            for (double s : logits) mx = std::max(mx, s);
            for (double s : logits) sum += std::exp(s - mx);
            for (double s : logits) prob.push_back(std::exp(s - mx) / sum);
            const double* g = &go[(b * c.T * c.H * c.W + ti) * hd + h * c.d];
            double* o = &r.out[(b * c.T * c.H * c.W + ti) * hd + h * c.d];
            std::vector<double> dp(prob.size());
            double D = 0;
            for (size_t j = 0; j < prob.size(); ++j) {
              for (int64_t e = 0; e < c.d; ++e) o[e] += prob[j] * vrow[j][e];
              for (int64_t e = 0; e < c.d; ++e) dp[j] += g[e] * vrow[j][e];
              D += prob[j] * dp[j];
            }
            for (size_t j = 0; j < prob.size(); ++j) {
              const double ds = prob[j] * (dp[j] - D);
              const int64_t tj = ktok[j];
              double* dk = tj >= 0 ? &r.dk[(b * c.T * c.H * c.W + tj) * hd + h * c.d] : &r.dpk[h * c.d];
              double* dv = tj >= 0 ? &r.dv[(b * c.T * c.H * c.W + tj) * hd + h * c.d] : &r.dpv[h * c.d];
              double* dq = &r.dq[(b * c.T * c.H * c.W + ti) * hd + h * c.d];
              for (int64_t e = 0; e < c.d; ++e) {
                dq[e] += ds * krow[j][e] * scale;
                dk[e] += ds * q[e] * scale;
                dv[e] += prob[j] * g[e];
              }
              if (c.bias == 1) r.dtable[kidx[j] * c.heads + h] += ds;
              if (c.bias == 2) r.dbias[kflat[j]] += ds;
            }
          }
  return r;
}

template <typename T>
bool check(const Case& c, std::mt19937& rng) {
  std::normal_distribution<double> nd;
  auto fill = [&](size_t n) {
    std::vector<double> v(n);
    for (auto& e : v) e = nd(rng);
    return v;
  };
  const int64_t tokens = c.B * c.T * c.H * c.W, hd = c.heads * c.d;
  int64_t N = 1, rows = 1;
  for (int i = 0; i < 3; ++i) {
    N *= c.window[i];
    rows *= 2 * c.window[i] - 1;
  }
  const auto qkv = fill(tokens * 3 * hd), go = fill(tokens * hd);
  const auto table = c.bias == 1 ? fill(rows * c.heads) : std::vector<double>();
  const auto dense = c.bias == 2 ? fill(c.heads * N * N) : std::vector<double>();
  const auto pk = c.pad_kv ? fill(hd) : std::vector<double>(hd, 0.0);
  const auto pv = c.pad_kv ? fill(hd) : std::vector<double>(hd, 0.0);
  const Naive want = naive(c, qkv, table, dense, pk, pv, go);

  auto cast = [](const std::vector<double>& v) { return std::vector<T>(v.begin(), v.end()); };
  const auto qkv_t = cast(qkv), go_t = cast(go), table_t = cast(table), dense_t = cast(dense), pk_t = cast(pk),
             pv_t = cast(pv);
  WindowAttentionShape s{};
  s.B = c.B; s.T = c.T; s.H = c.H; s.W = c.W; s.heads = c.heads; s.d = c.d;
  for (int i = 0; i < 3; ++i) {
    s.window[i] = c.window[i];
    s.shift[i] = c.shift[i];
  }
  s.pad_first = c.pad_first;
  s.mask_value = c.mask_value;
  s.scale = 1.0 / std::sqrt(double(c.d));
  const TokenStrides st{c.T * c.H * c.W * 3 * hd, c.H * c.W * 3 * hd, c.W * 3 * hd, 3 * hd, c.d};
  const TokenStrides gst{c.T * c.H * c.W * hd, c.H * c.W * hd, c.W * hd, hd, c.d};
  pyvl::WindowAttentionInputs<T> in{qkv_t.data(), st, qkv_t.data() + hd, st, qkv_t.data() + 2 * hd, st,
                                    c.bias == 1 ? table_t.data() : nullptr, c.bias == 2 ? dense_t.data() : nullptr,
                                    nullptr, c.pad_kv ? pk_t.data() : nullptr, c.pad_kv ? pv_t.data() : nullptr};
  // Outputs start as NaN so an element the kernel forgets to write fails the comparison.
  std::vector<T> out(tokens * hd, T(NAN)), lse(tokens * c.heads, T(NAN)), dq(out), dk(out), dv(out),
      dtable(table.size(), T(NAN)), dbias(dense.size(), T(NAN)), dpk(hd, T(NAN)), dpv(hd, T(NAN));
  pyvl::cpu::window_attention_forward<T>(s, in, out.data(), lse.data());
  pyvl::WindowAttentionGrads<T> g{dq.data(), dk.data(), dv.data(), c.bias == 1 ? dtable.data() : nullptr,
                                  c.bias == 2 ? dbias.data() : nullptr, nullptr, dpk.data(), dpv.data()};
  pyvl::cpu::window_attention_backward<T>(s, in, go_t.data(), gst, g);
  const double tol = sizeof(T) == 4 ? 2e-5 : 1e-11;
  bool ok = close("out", out, want.out, tol) && close("dq", dq, want.dq, tol) && close("dk", dk, want.dk, tol) &&
            close("dv", dv, want.dv, tol) && close("d_pad_k", dpk, want.dpk, tol) &&
            close("d_pad_v", dpv, want.dpv, tol);
  if (ok && c.bias == 1) ok = close("d_table", dtable, want.dtable, tol);
  if (ok && c.bias == 2) ok = close("d_bias", dbias, want.dbias, tol);
  return ok;
}

}  // namespace

int main() {
  const double ninf = -INFINITY;
  // B, T, H, W, heads, d, window, shift, pad_first, mask_value, bias, pad_kv
  const Case cases[] = {
      {2, 1, 9, 11, 2, 8, {1, 7, 7}, {0, 3, 3}, true, -100.0, 1, true},    // Swin-like, padded both dims
      {1, 1, 9, 11, 3, 5, {1, 4, 5}, {0, 2, 3}, false, -100.0, 2, true},   // timm order, dense bias
      {1, 1, 6, 6, 1, 17, {1, 3, 3}, {0, 0, 0}, true, -100.0, 0, false},   // no shift, divisible, d not a multiple of 8
      {1, 1, 4, 3, 2, 4, {1, 7, 7}, {0, 0, 0}, true, -100.0, 1, true},     // window larger than the input
      {1, 3, 9, 11, 2, 5, {2, 4, 5}, {1, 2, 3}, true, ninf, 1, true},      // 3D, -inf mask
      {2, 5, 6, 7, 1, 9, {2, 3, 3}, {1, 1, 2}, false, -100.0, 2, false},   // 3D, timm order, dense bias
      {1, 2, 10, 10, 2, 16, {2, 3, 9}, {1, 1, 4}, true, -100.0, 1, true},  // run of 9 keys (> 8-wide fast path)
  };
  std::mt19937 rng(1234);
  int failures = 0;
  for (const Case& c : cases) {
    const bool ok = check<float>(c, rng) && check<double>(c, rng);
    if (!ok) {
      ++failures;
      std::printf("FAIL B=%ld T=%ld H=%ld W=%ld heads=%ld d=%ld window=%ldx%ldx%ld shift=%ld,%ld,%ld pad_first=%d "
                  "bias=%d pad_kv=%d\n",
                  long(c.B), long(c.T), long(c.H), long(c.W), long(c.heads), long(c.d), long(c.window[0]),
                  long(c.window[1]), long(c.window[2]), long(c.shift[0]), long(c.shift[1]), long(c.shift[2]),
                  int(c.pad_first), c.bias, int(c.pad_kv));
    }
  }
  std::printf("%s: %d failing cases\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}
