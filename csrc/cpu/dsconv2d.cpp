// The fused depthwise-separable block on the CPU.
//
// Each OpenMP task is a strip of TP output pixels of one image. The task computes the depthwise result
// (+ dw_bias, act_dw) for the strip and all C channels into a thread-private buffer sized to stay in L2,
// then multiplies it by the pointwise weight with the register-blocked micro-kernel, adding pw_bias and
// act_pw in the epilogue and writing straight into the output. The whole depthwise intermediate never
// exists, so its N*C*OH*OW round trip through memory disappears.
//
// The GEMM is oriented so that the output's contiguous dimension is the micro-kernel's vector dimension:
//   NHWC: out[p][o]  = sum_c mid[p][c] * W[o][c]  -> rows = pixels, columns = out channels (W packed in NR panels)
//   NCHW: out[o][p]  = sum_c W[o][c] * mid[c][p]  -> rows = out channels (W packed in MR panels), columns = pixels
// and the strip buffer is kept in the layout the depthwise pass produces naturally for that input layout.
#include <algorithm>
#include <numeric>
#include <vector>

#include "cpu/depthwise_conv2d.h"
#include "cpu/gemm_microkernel.h"

namespace pyvl {
namespace cpu {
namespace {

constexpr int MR = kWideMR;
constexpr int NR = kWideNR;

// Strip buffer budget: half of a 1 MiB L2, leaving room for the weight panel and the input rows.
constexpr int64_t kStripBytes = 512 * 1024;

template <typename T>
inline T activate(T v, Activation act) {
  switch (act) {
    case Activation::ReLU: return std::max(v, T(0));
    case Activation::ReLU6: return std::min(std::max(v, T(0)), T(6));
    default: return v;
  }
}

template <typename T>
inline void activate_span(T* v, int64_t n, Activation act) {
  if (act == Activation::ReLU) {
    for (int64_t i = 0; i < n; ++i) v[i] = std::max(v[i], T(0));
  } else if (act == Activation::ReLU6) {
    for (int64_t i = 0; i < n; ++i) v[i] = std::min(std::max(v[i], T(0)), T(6));
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Output columns ow whose input column ow*stride + off lies in [0, W): [lo, hi).
inline void valid_cols(int64_t off, int64_t stride, int64_t W, int64_t& lo, int64_t& hi) {
  lo = off >= 0 ? 0 : ceil_div(-off, stride);
  hi = W - 1 - off >= 0 ? (W - 1 - off) / stride + 1 : 0;
}

// Depthwise for pixels [pb, pe) of image n, NHWC input, into mid[p - pb][c]. wt is the weight as [KH*KW][C]
// so that the inner loop runs over contiguous channels for both x and the weight.
template <typename T>
void depthwise_strip_nhwc(const T* x, const T* wt, const T* bias, T* mid, const Conv2dShape& s, int64_t n,
                          int64_t pb, int64_t pe, Activation act) {
  const int64_t C = s.C;
  for (int64_t p = pb; p < pe; ++p) {
    const int64_t oh = p / s.OW, ow = p % s.OW;
    T* m = mid + (p - pb) * C;
    if (bias)
      for (int64_t c = 0; c < C; ++c) m[c] = bias[c];
    else
      for (int64_t c = 0; c < C; ++c) m[c] = T(0);
    for (int64_t kh = 0; kh < s.KH; ++kh) {
      const int64_t ih = oh * s.stride_h - s.pad_h + kh * s.dil_h;
      if (ih < 0 || ih >= s.H) continue;
      for (int64_t kw = 0; kw < s.KW; ++kw) {
        const int64_t iw = ow * s.stride_w - s.pad_w + kw * s.dil_w;
        if (iw < 0 || iw >= s.W) continue;
        const T* __restrict xr = x + ((n * s.H + ih) * s.W + iw) * C;
        const T* __restrict wr = wt + (kh * s.KW + kw) * C;
        T* __restrict mr = m;
        for (int64_t c = 0; c < C; ++c) mr[c] += xr[c] * wr[c];
      }
    }
    activate_span(m, C, act);
  }
}

// Depthwise for pixels [pb, pe) of image n, NCHW input, into mid[c][p - pb] (row stride ldm).
template <typename T>
void depthwise_strip_nchw(const T* x, const T* w, const T* bias, T* mid, int64_t ldm, const Conv2dShape& s,
                          int64_t n, int64_t pb, int64_t pe, Activation act) {
  const int64_t oh_b = pb / s.OW, oh_e = (pe - 1) / s.OW;
  for (int64_t c = 0; c < s.C; ++c) {
    const T* wc = w + c * s.KH * s.KW;
    const T* xc = x + (n * s.C + c) * s.H * s.W;
    const T b = bias ? bias[c] : T(0);
    for (int64_t oh = oh_b; oh <= oh_e; ++oh) {
      const int64_t ow_b = oh == oh_b ? pb % s.OW : 0;
      const int64_t ow_e = oh == oh_e ? (pe - 1) % s.OW + 1 : s.OW;
      T* __restrict r = mid + c * ldm + oh * s.OW + ow_b - pb;
      for (int64_t i = 0; i < ow_e - ow_b; ++i) r[i] = b;
      for (int64_t kh = 0; kh < s.KH; ++kh) {
        const int64_t ih = oh * s.stride_h - s.pad_h + kh * s.dil_h;
        if (ih < 0 || ih >= s.H) continue;
        const T* __restrict xr = xc + ih * s.W;
        for (int64_t kw = 0; kw < s.KW; ++kw) {
          const int64_t off = kw * s.dil_w - s.pad_w;
          int64_t lo, hi;
          valid_cols(off, s.stride_w, s.W, lo, hi);
          lo = std::max(lo, ow_b);
          hi = std::min(hi, ow_e);
          const T wv = wc[kh * s.KW + kw];
          if (s.stride_w == 1) {
            for (int64_t ow = lo; ow < hi; ++ow) r[ow - ow_b] += wv * xr[ow + off];
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) r[ow - ow_b] += wv * xr[ow * s.stride_w + off];
          }
        }
      }
      activate_span(r, ow_e - ow_b, act);
    }
  }
}

// Writes acc[0:mr][0:nr] + bias, activated, to out (row stride ldc). The bias runs along rows or columns.
template <typename T>
inline void epilogue(const T acc[MR][NR], int mr, int nr, const T* row_bias, const T* col_bias, Activation act,
                     T* out, int64_t ldc) {
  for (int i = 0; i < mr; ++i) {
    T* o = out + i * ldc;
    const T rb = row_bias ? row_bias[i] : T(0);
    if (col_bias) {
      for (int j = 0; j < nr; ++j) o[j] = acc[i][j] + rb + col_bias[j];
    } else {
      for (int j = 0; j < nr; ++j) o[j] = acc[i][j] + rb;
    }
    activate_span(o, nr, act);
  }
}

}  // namespace

template <typename T>
void dsconv2d_forward(const T* x, const T* dw_weight, const T* dw_bias, const T* pw_weight, const T* pw_bias, T* out,
                      const Conv2dShape& s, int64_t C_out, Activation act_dw, Activation act_pw, Layout layout) {
  const int64_t C = s.C, P = s.OH * s.OW;
  const bool nhwc = layout == Layout::NHWC;

  // Strip length: a multiple of lcm(MR, NR) (48 for 6 x 16 tiles, 96 for 12 x 32) so that only the image's last
  // strip has partial micro-tiles.
  constexpr int64_t kTileLcm = std::lcm(MR, NR);
  int64_t TP = kStripBytes / static_cast<int64_t>(sizeof(T)) / C / kTileLcm * kTileLcm;
  TP = std::max<int64_t>(TP, kTileLcm);
  TP = std::min(TP, P);
  const int64_t strips = ceil_div(P, TP);

  // The pointwise weight, packed once into the micro-kernel's panel order, zero-padded past C_out.
  const int64_t panel = nhwc ? NR : MR;
  const int64_t panels = ceil_div(C_out, panel);
  std::vector<T> packed(static_cast<size_t>(panels * C * panel), T(0));
  for (int64_t o = 0; o < C_out; ++o)
    for (int64_t c = 0; c < C; ++c) packed[((o / panel) * C + c) * panel + o % panel] = pw_weight[o * C + c];

  std::vector<T> dw_t;
  if (nhwc) {
    const int64_t KK = s.KH * s.KW;
    dw_t.resize(static_cast<size_t>(KK * C));
    for (int64_t c = 0; c < C; ++c)
      for (int64_t k = 0; k < KK; ++k) dw_t[k * C + c] = dw_weight[c * KK + k];
  }

  // NCHW: mid rows padded to whole NR vectors, read (never stored) past the strip by the last micro-tiles.
  // NHWC: MR spare pixel rows so the last partial micro-tile reads in-bounds rows.
  const int64_t ldm = nhwc ? C : ceil_div(TP, NR) * NR;
  const size_t mid_size = static_cast<size_t>(nhwc ? (TP + MR) * C : C * ldm);

#pragma omp parallel
  {
    std::vector<T> mid(mid_size, T(0));
    alignas(64) T acc[MR][NR];
#pragma omp for schedule(static)
    for (int64_t t = 0; t < s.N * strips; ++t) {
      const int64_t n = t / strips;
      const int64_t pb = (t % strips) * TP, pe = std::min(P, pb + TP), np = pe - pb;
      if (nhwc) {
        depthwise_strip_nhwc(x, dw_t.data(), dw_bias, mid.data(), s, n, pb, pe, act_dw);
        T* out_strip = out + (n * P + pb) * C_out;
        for (int64_t jp = 0; jp < panels; ++jp) {
          const int64_t j0 = jp * NR;
          const int nr = static_cast<int>(std::min<int64_t>(NR, C_out - j0));
          const T* bp = packed.data() + jp * C * NR;
          for (int64_t i0 = 0; i0 < np; i0 += MR) {
            const int mr = static_cast<int>(std::min<int64_t>(MR, np - i0));
            gemm_micro_wide<T>(C, mid.data() + i0 * C, C, 1, bp, NR, acc);
            epilogue<T>(acc, mr, nr, nullptr, pw_bias ? pw_bias + j0 : nullptr, act_pw, out_strip + i0 * C_out + j0,
                        C_out);
          }
        }
      } else {
        depthwise_strip_nchw(x, dw_weight, dw_bias, mid.data(), ldm, s, n, pb, pe, act_dw);
        for (int64_t ip = 0; ip < panels; ++ip) {
          const int64_t i0 = ip * MR;
          const int mr = static_cast<int>(std::min<int64_t>(MR, C_out - i0));
          const T* ap = packed.data() + ip * C * MR;
          T* out_rows = out + (n * C_out + i0) * P + pb;
          for (int64_t j0 = 0; j0 < np; j0 += NR) {
            const int nr = static_cast<int>(std::min<int64_t>(NR, np - j0));
            gemm_micro_wide<T>(C, ap, 1, MR, mid.data() + j0, ldm, acc);
            epilogue<T>(acc, mr, nr, pw_bias ? pw_bias + i0 : nullptr, nullptr, act_pw, out_rows + j0, P);
          }
        }
      }
    }
  }
}

template void dsconv2d_forward<float>(const float*, const float*, const float*, const float*, const float*, float*,
                                      const Conv2dShape&, int64_t, Activation, Activation, Layout);
template void dsconv2d_forward<double>(const double*, const double*, const double*, const double*, const double*,
                                       double*, const Conv2dShape&, int64_t, Activation, Activation, Layout);

}  // namespace cpu
}  // namespace pyvl
