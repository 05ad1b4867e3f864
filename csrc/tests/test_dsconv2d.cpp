// Checks the fused depthwise-separable block (depthwise + bias + activation -> pointwise + bias + activation;
// NCHW and NHWC; float and double) against a naive loop written here. Shapes are chosen so that the pixel count
// and C_out leave partial micro-tiles of both GEMM tile sizes (6 x 16 and 12 x 32) and strips of several tiles; NHWC
// strips that span images; channel counts above the GEMM's reduction block (256), so partial sums are carried.
// Exits non-zero on the first mismatch.
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/depthwise_conv2d.h"
#include "tests/check.h"

using pyvl::Activation;
using pyvl::Conv2dShape;
using pyvl::Layout;

namespace {

double act(double v, Activation a) {
  if (a == Activation::ReLU) return v > 0 ? v : 0;
  if (a == Activation::ReLU6) return v < 0 ? 0 : (v > 6 ? 6 : v);
  return v;
}

Conv2dShape make_shape(int64_t N, int64_t C, int64_t H, int64_t W, int64_t K, int64_t st, int64_t pad) {
  Conv2dShape s{};
  s.N = N; s.C = C; s.H = H; s.W = W; s.KH = s.KW = K;
  s.stride_h = s.stride_w = st; s.pad_h = s.pad_w = pad; s.dil_h = s.dil_w = 1;
  s.OH = (H + 2 * pad - (K - 1) - 1) / st + 1;
  s.OW = (W + 2 * pad - (K - 1) - 1) / st + 1;
  return s;
}

template <typename T>
bool check(const Conv2dShape& s, int64_t C_out, Layout l, Activation a_dw, Activation a_pw, std::mt19937& rng) {
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  auto fill = [&](int64_t n) {
    std::vector<double> v(n);
    for (auto& e : v) e = u(rng);
    return v;
  };
  const int64_t KK = s.KH * s.KW, P = s.OH * s.OW;
  const auto x = fill(s.N * s.C * s.H * s.W), dw = fill(s.C * KK), db = fill(s.C), pw = fill(C_out * s.C),
             pb = fill(C_out);
  auto xi = [&](int64_t n, int64_t c, int64_t h, int64_t w) {
    return l == Layout::NCHW ? ((n * s.C + c) * s.H + h) * s.W + w : ((n * s.H + h) * s.W + w) * s.C + c;
  };
  std::vector<double> want(s.N * C_out * P), mid(s.C);
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t oh = 0; oh < s.OH; ++oh)
      for (int64_t ow = 0; ow < s.OW; ++ow) {
        for (int64_t c = 0; c < s.C; ++c) {
          double acc = db[c];
          for (int64_t kh = 0; kh < s.KH; ++kh)
            for (int64_t kw = 0; kw < s.KW; ++kw) {
              const int64_t ih = oh * s.stride_h - s.pad_h + kh, iw = ow * s.stride_w - s.pad_w + kw;
              if (ih >= 0 && ih < s.H && iw >= 0 && iw < s.W) acc += x[xi(n, c, ih, iw)] * dw[c * KK + kh * s.KW + kw];
            }
          mid[c] = act(acc, a_dw);
        }
        for (int64_t o = 0; o < C_out; ++o) {
          double acc = pb[o];
          for (int64_t c = 0; c < s.C; ++c) acc += pw[o * s.C + c] * mid[c];
          const int64_t p = oh * s.OW + ow;
          want[l == Layout::NCHW ? (n * C_out + o) * P + p : (n * P + p) * C_out + o] = act(acc, a_pw);
        }
      }
  auto cast = [](const std::vector<double>& v) { return std::vector<T>(v.begin(), v.end()); };
  const auto xt = cast(x), dwt = cast(dw), dbt = cast(db), pwt = cast(pw), pbt = cast(pb);
  std::vector<T> got(want.size(), T(NAN));  // an element the kernel forgets to write fails the comparison
  pyvl::cpu::dsconv2d_forward<T>(xt.data(), dwt.data(), dbt.data(), pwt.data(), pbt.data(), got.data(), s, C_out,
                                 a_dw, a_pw, l);
  const double tol = sizeof(T) == 4 ? 1e-4 : 1e-12;
  return pyvl_test::close("dsconv2d", got, want, tol);
}

}  // namespace

int main() {
  struct Case {
    Conv2dShape s;
    int64_t C_out;
  };
  const std::vector<Case> cases = {
      {make_shape(2, 8, 9, 11, 3, 1, 1), 16},     // 99 pixels per image: partial tiles along pixels
      {make_shape(1, 24, 15, 13, 3, 2, 1), 37},   // stride 2; C_out leaves a partial panel of 16 and of 32
      {make_shape(3, 5, 7, 7, 3, 1, 1), 70},      // MobileNet's 7x7 with few channels
      {make_shape(1, 64, 24, 24, 5, 1, 2), 33},   // kernel 5; 576 pixels: several strips of 96 or 48
      {make_shape(2, 3, 6, 5, 3, 1, 0), 1},       // no padding, one output channel
      {make_shape(3, 300, 5, 5, 3, 1, 1), 45},    // C > 256: the reduction in blocks (256 + 44), 25-pixel images
                                                  // in strips that cross image boundaries
      {make_shape(5, 520, 7, 7, 3, 1, 1), 70},    // three reduction blocks (the last of 8 channels), 245 rows
      {make_shape(2, 40, 13, 13, 3, 2, 1), 64},   // stride 2 into 7x7; 40 channels: a 16-vector, then 8 single
  };
  std::mt19937 rng(4321);
  int failures = 0;
  for (const auto& c : cases)
    for (Layout l : {Layout::NCHW, Layout::NHWC})
      for (Activation a : {Activation::None, Activation::ReLU, Activation::ReLU6}) {
        const bool ok = check<float>(c.s, c.C_out, l, a, Activation::ReLU6, rng) &&
                        check<double>(c.s, c.C_out, l, Activation::ReLU, a, rng);
        if (!ok) {
          ++failures;
          std::printf("FAIL N=%ld C=%ld H=%ld W=%ld K=%ld stride=%ld C_out=%ld %s act=%d\n", long(c.s.N),
                      long(c.s.C), long(c.s.H), long(c.s.W), long(c.s.KH), long(c.s.stride_h), long(c.C_out),
                      l == Layout::NCHW ? "NCHW" : "NHWC", int(a));
        }
      }
  std::printf("%s: %d failing cases\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}
