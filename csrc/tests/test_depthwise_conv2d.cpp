// Checks the depthwise kernels (forward, backward_input, backward_weight; NCHW and NHWC; float and double)
// against naive loops written here, independent of the kernels' tap tables and interior/border split.
// Exits non-zero on the first mismatch.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/depthwise_conv2d.h"
#include "tests/check.h"

using pyvl::Conv2dShape;
using pyvl::Layout;

namespace {

using pyvl_test::close;

int64_t at(Layout l, int64_t n, int64_t c, int64_t h, int64_t w, int64_t C, int64_t H, int64_t W) {
  return l == Layout::NCHW ? ((n * C + c) * H + h) * W + w : ((n * H + h) * W + w) * C + c;
}

Conv2dShape make_shape(int64_t N, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t sh, int64_t sw,
                       int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  Conv2dShape s{};
  s.N = N; s.C = C; s.H = H; s.W = W; s.KH = KH; s.KW = KW;
  s.stride_h = sh; s.stride_w = sw; s.pad_h = ph; s.pad_w = pw; s.dil_h = dh; s.dil_w = dw;
  s.OH = (H + 2 * ph - dh * (KH - 1) - 1) / sh + 1;
  s.OW = (W + 2 * pw - dw * (KW - 1) - 1) / sw + 1;
  return s;
}

// Naive references in double, all three from the same forward index relation so they agree by construction.
void reference(const Conv2dShape& s, Layout l, const std::vector<double>& x, const std::vector<double>& w,
               const std::vector<double>& b, const std::vector<double>& go, std::vector<double>& out,
               std::vector<double>& gx, std::vector<double>& gw) {
  out.assign(s.N * s.C * s.OH * s.OW, 0.0);
  gx.assign(s.N * s.C * s.H * s.W, 0.0);
  gw.assign(s.C * s.KH * s.KW, 0.0);
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t c = 0; c < s.C; ++c)
      for (int64_t oh = 0; oh < s.OH; ++oh)
        for (int64_t ow = 0; ow < s.OW; ++ow) {
          const int64_t o = at(l, n, c, oh, ow, s.C, s.OH, s.OW);
          double acc = b[c];
          for (int64_t kh = 0; kh < s.KH; ++kh)
            for (int64_t kw = 0; kw < s.KW; ++kw) {
              const int64_t ih = oh * s.stride_h - s.pad_h + kh * s.dil_h;
              const int64_t iw = ow * s.stride_w - s.pad_w + kw * s.dil_w;
              if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) continue;
              const int64_t i = at(l, n, c, ih, iw, s.C, s.H, s.W);
              const int64_t k = (c * s.KH + kh) * s.KW + kw;
              acc += x[i] * w[k];
              gx[i] += go[o] * w[k];
              gw[k] += go[o] * x[i];
            }
          out[o] = acc;
        }
}

template <typename T>
bool check(const Conv2dShape& s, Layout l, std::mt19937& rng, bool with_bias) {
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  auto fill = [&](int64_t n) {
    std::vector<double> v(n);
    for (auto& e : v) e = u(rng);
    return v;
  };
  const auto x = fill(s.N * s.C * s.H * s.W), w = fill(s.C * s.KH * s.KW), go = fill(s.N * s.C * s.OH * s.OW);
  auto b = fill(s.C);
  if (!with_bias) b.assign(s.C, 0.0);
  std::vector<double> out_ref, gx_ref, gw_ref;
  reference(s, l, x, w, b, go, out_ref, gx_ref, gw_ref);

  auto cast = [](const std::vector<double>& v) { return std::vector<T>(v.begin(), v.end()); };
  const auto xt = cast(x), wt = cast(w), bt = cast(b), got = cast(go);
  // Outputs start as NaN so an element the kernel forgets to write fails the comparison.
  std::vector<T> out(out_ref.size(), T(NAN)), gx(gx_ref.size(), T(NAN)), gw(gw_ref.size(), T(NAN));
  pyvl::cpu::depthwise_conv2d_forward<T>(xt.data(), wt.data(), with_bias ? bt.data() : nullptr, out.data(), s, l);
  pyvl::cpu::depthwise_conv2d_backward_input<T>(got.data(), wt.data(), gx.data(), s, l);
  pyvl::cpu::depthwise_conv2d_backward_weight<T>(got.data(), xt.data(), gw.data(), s, l);
  const double tol = sizeof(T) == 4 ? 2e-5 : 1e-12;
  return close("forward", out, out_ref, tol) && close("backward_input", gx, gx_ref, tol) &&
         close("backward_weight", gw, gw_ref, tol);
}

}  // namespace

int main() {
  // N, C, H, W, KH, KW, stride h/w, pad h/w, dilation h/w
  const Conv2dShape shapes[] = {
      make_shape(2, 8, 16, 16, 3, 3, 1, 1, 1, 1, 1, 1),    // MobileNet stride 1
      make_shape(2, 40, 17, 15, 3, 3, 2, 2, 1, 1, 1, 1),   // stride 2, odd sizes, channels not a multiple of 8
      make_shape(1, 37, 13, 19, 3, 3, 1, 1, 2, 2, 2, 2),   // dilation 2
      make_shape(3, 5, 11, 12, 5, 5, 1, 2, 2, 0, 1, 1),    // kernel 5, mixed stride, no column padding
      make_shape(1, 33, 14, 9, 7, 7, 3, 2, 3, 3, 1, 2),    // kernel 7, stride 3, dilation 2 along w
      make_shape(2, 3, 5, 4, 7, 3, 1, 1, 3, 3, 1, 1),      // kernel wider than the input; all border
      make_shape(1, 16, 9, 9, 1, 1, 2, 2, 0, 0, 1, 1),     // 1x1 strided
      make_shape(2, 9, 8, 10, 3, 5, 2, 3, 3, 2, 2, 1),     // padding larger than the kernel's reach
      make_shape(1, 4, 6, 71, 3, 3, 1, 1, 1, 1, 1, 1),     // wide rows: in-place interior/border split (no pad copy)
      make_shape(1, 3, 7, 67, 5, 3, 2, 2, 2, 1, 1, 1),     // wide rows, stride 2
      // NHWC forward strips (kernel width 3, stride_w 1 or 2): widths that are not a multiple of the 4-pixel strip,
      // channels that fill two vectors, one vector and single lanes, strips that lie partly or wholly in the padding.
      make_shape(2, 27, 9, 13, 3, 3, 1, 1, 1, 1, 1, 1),    // channels 16 + 8 + 3 (float), 8 + 8 + 4 + 3 (double)
      make_shape(1, 50, 7, 7, 3, 3, 1, 1, 1, 1, 1, 1),     // MobileNet's 7x7: strips of 4 and 3, both in the padding
      make_shape(2, 35, 11, 14, 3, 3, 2, 2, 1, 1, 1, 1),   // stride 2, even width
      make_shape(1, 19, 10, 9, 5, 3, 2, 1, 2, 0, 2, 1),    // 5x3 kernel, no column padding, dilated strided rows
      make_shape(1, 24, 5, 2, 3, 3, 1, 2, 1, 2, 1, 1),     // width 2, padding 2: strips over the padding alone
      make_shape(3, 16, 6, 30, 3, 3, 1, 1, 0, 0, 1, 1),    // no padding: interior strips only, exact vectors
      make_shape(1, 2, 19, 150, 3, 3, 1, 1, 1, 1, 1, 1),   // NCHW 16-lane chunks: 10 per row (tiles of 8 + 2)
      make_shape(1, 2, 13, 301, 3, 3, 2, 2, 1, 1, 1, 1),   // the same at stride 2, odd width
      make_shape(1, 2, 9, 170, 5, 5, 1, 1, 2, 2, 1, 1),    // 11 chunks through the generic (non-3x3) tile
      make_shape(2, 3, 23, 16, 3, 3, 2, 2, 1, 1, 1, 1),    // 3x3 stride 2 rows in tiles of 8 + 4 output rows
      // NCHW rows of at most 8 outputs, two planes per vector (AVX-512): an odd plane count (the last alone), pairs
      // across images, padding 2, tall planes in row tiles of 8 + 8 + 4, stride 2.
      make_shape(3, 5, 5, 5, 3, 3, 1, 1, 2, 2, 1, 1),      // 15 planes, 7x7 outputs of 5x5 inputs
      make_shape(1, 3, 20, 6, 3, 3, 1, 1, 1, 1, 1, 1),     // 20 rows of 6
      make_shape(2, 7, 14, 13, 3, 3, 2, 2, 1, 1, 1, 1),    // MobileNet's 14x14 stride 2 (7 wide), odd width
      // rows of at most 4 outputs: two planes per vector under AVX2 too
      make_shape(3, 5, 7, 7, 3, 3, 2, 2, 1, 1, 1, 1),      // 15 planes, 4x4 outputs at stride 2
      make_shape(1, 6, 9, 4, 3, 3, 1, 1, 1, 1, 1, 1),      // 9 rows of 4 at stride 1
      // NHWC input gradient at stride_w 2 through the strips (TransposedCols2): even column padding (D = 2), odd
      // padding past the kernel's reach, and 530 channels (8-pixel strips under AVX-512).
      make_shape(2, 21, 9, 18, 3, 3, 1, 2, 1, 0, 1, 1),    // stride 1 x 2, no column padding
      make_shape(1, 9, 7, 25, 3, 3, 3, 2, 1, 3, 1, 1),     // column padding 3: strips wholly in the padding
      make_shape(1, 530, 6, 11, 3, 3, 2, 2, 1, 1, 1, 1),   // 530 channels, stride 2
      // NCHW through the strips (AVX2): planes above 64 x 64 pixels go a row at a time through a ring of input rows;
      // channel blocks with a tail (16 + 3), a 5-row dilated kernel whose ring spans 9 rows, stride 2 both ways.
      make_shape(1, 19, 66, 70, 3, 3, 1, 1, 1, 1, 1, 1),   // ring of 3 rows, stride 1
      make_shape(1, 10, 75, 61, 5, 3, 2, 2, 2, 1, 2, 1),   // ring of 9 rows, stride 2
  };
  std::mt19937 rng(1234);
  int failures = 0;
  for (const auto& s : shapes) {
    if (s.OH < 1 || s.OW < 1) {
      std::printf("bad test shape: empty output\n");
      return 2;
    }
    for (Layout l : {Layout::NCHW, Layout::NHWC}) {
      for (bool bias : {true, false}) {
        const bool ok = check<float>(s, l, rng, bias) && check<double>(s, l, rng, bias);
        if (!ok) {
          ++failures;
          std::printf("FAIL N=%ld C=%ld H=%ld W=%ld K=%ldx%ld stride=%ld,%ld pad=%ld,%ld dil=%ld,%ld %s bias=%d\n",
                      long(s.N), long(s.C), long(s.H), long(s.W), long(s.KH), long(s.KW), long(s.stride_h),
                      long(s.stride_w), long(s.pad_h), long(s.pad_w), long(s.dil_h), long(s.dil_w),
                      l == Layout::NCHW ? "NCHW" : "NHWC", int(bias));
        }
      }
    }
  }
  std::printf("%s: %d failing cases\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}
