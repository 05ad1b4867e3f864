// The fused depthwise-separable block on the CPU.
//
// Each OpenMP task is a strip of TP output pixels (NHWC: of the whole batch; NCHW: of one image). The task computes
// the depthwise result (+ dw_bias, act_dw) for the strip and all C channels into a thread-private buffer sized to
// stay in L2, then multiplies it by the pointwise weight with the register-blocked micro-kernel, adding pw_bias and
// act_pw in the tile's epilogue and writing straight into the output. The whole depthwise intermediate never
// exists, so its N*C*OH*OW round trip through memory disappears.
//
// The GEMM is oriented so that the output's contiguous dimension is the micro-kernel's vector dimension:
//   NHWC: out[p][o]  = sum_c mid[p][c] * W[o][c]  -> rows = pixels, columns = out channels (W packed in NR panels)
//   NCHW: out[o][p]  = sum_c W[o][c] * mid[c][p]  -> rows = out channels (W packed in MR panels), columns = pixels
// and the strip buffer is kept in the layout the depthwise pass produces naturally for that input layout.
#include <algorithm>
#include <memory>
#include <numeric>
#include <vector>

#include <omp.h>

#include "cpu/depthwise_conv2d.h"
#include "cpu/gemm_microkernel.h"
#include "cpu/simd.h"

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

// One micro-tile of the pointwise GEMM with its epilogue. The reduction over K may come in blocks: a block that is
// not the last (!finish) stores its sums to `part` (a private MR x NR tile, row stride NR), and a later block
// (accumulate) adds them back. The last block adds the bias (along rows or along columns), activates, and writes
// out[0:mr][0:nr] (row stride ldc). Partial sums go to `part` rather than to out, so out is only ever written, once
// (out's rows can lie 4 KiB apart, a whole tile in two L1 sets; the two measured the same at C = 512 and 1024).
// Rows and columns past mr / nr are computed on whatever A and B hold there and never written to out.
template <typename T>
struct GemmTile {
  int64_t K;
  int mr, nr;
  bool accumulate, finish;
  T* part;
  const T* row_bias;
  const T* col_bias;
  Activation act;
};

template <typename T>
inline void gemm_tile(const GemmTile<T>& t, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb, T* out,
                      int64_t ldc) {
  alignas(64) T acc[MR][NR];
  gemm_micro_wide<T>(t.K, A, a_rs, a_ks, B, ldb, acc);
  // The fields in locals, and one plain loop per step: stores through out may alias t, which would otherwise make
  // the compiler reload every field per element and keep these loops scalar.
  const int mr = t.mr, nr = t.nr;
  const T* col_bias = t.col_bias;
  T* part = t.part;
  if (t.accumulate)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] += part[i * NR + j];
  if (!t.finish) {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) part[i * NR + j] = acc[i][j];
    return;
  }
  // Sum and bias written straight to out, then activated there: 1.2-1.6x faster at C = 32..128 on AVX2 than
  // finishing each row in acc and copying it.
  const Activation act = t.act;
  for (int i = 0; i < mr; ++i) {
    T* o = out + i * ldc;
    const T rb = t.row_bias ? t.row_bias[i] : T(0);
    if (col_bias) {
      for (int j = 0; j < nr; ++j) o[j] = acc[i][j] + rb + col_bias[j];
    } else {
      for (int j = 0; j < nr; ++j) o[j] = acc[i][j] + rb;
    }
    activate_span(o, nr, act);
  }
}

#if defined(__AVX512F__)
// 12 x 32 floats in 24 zmm accumulators + 2 for B + 1 broadcast, of 32 registers; the epilogue runs on the
// accumulators and stores with lane masks, so a tile costs no round trip through a buffer.
static_assert(MR == 12 && NR == 32, "the AVX-512 tile is 12 x 32");
template <>
inline void gemm_tile<float>(const GemmTile<float>& t, const float* A, int64_t a_rs, int64_t a_ks, const float* B,
                             int64_t ldb, float* out, int64_t ldc) {
  const __mmask16 m0 = t.nr >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << t.nr) - 1);
  const __mmask16 m1 = t.nr >= 32 ? __mmask16(0xFFFF) : t.nr > 16 ? __mmask16((1u << (t.nr - 16)) - 1) : 0;
  __m512 c[MR][2];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    if (t.accumulate) {
      c[i][0] = _mm512_loadu_ps(t.part + i * NR);
      c[i][1] = _mm512_loadu_ps(t.part + i * NR + 16);
    } else {
      c[i][0] = c[i][1] = _mm512_setzero_ps();
    }
  }
  wide_kloop(t.K, A, a_rs, a_ks, B, ldb, c);
  if (!t.finish) {
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      _mm512_storeu_ps(t.part + i * NR, c[i][0]);
      _mm512_storeu_ps(t.part + i * NR + 16, c[i][1]);
    }
    return;
  }
  {
    const __m512 cb0 = t.col_bias ? _mm512_maskz_loadu_ps(m0, t.col_bias) : _mm512_setzero_ps();
    const __m512 cb1 = t.col_bias ? _mm512_maskz_loadu_ps(m1, t.col_bias + 16) : _mm512_setzero_ps();
    const __m512 zero = _mm512_setzero_ps(), six = _mm512_set1_ps(6.0f);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      if (i >= t.mr) break;
      const __m512 rb = _mm512_set1_ps(t.row_bias ? t.row_bias[i] : 0.0f);
      for (int h = 0; h < 2; ++h) {
        __m512 v = _mm512_add_ps(_mm512_add_ps(c[i][h], rb), h ? cb1 : cb0);
        // max/min return their second operand when either is NaN: NaN passes through, as activate().
        if (t.act != Activation::None) v = _mm512_max_ps(zero, v);
        if (t.act == Activation::ReLU6) v = _mm512_min_ps(six, v);
        c[i][h] = v;
      }
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    if (i >= t.mr) break;
    _mm512_mask_storeu_ps(out + i * ldc, m0, c[i][0]);
    _mm512_mask_storeu_ps(out + i * ldc + 16, m1, c[i][1]);
  }
}
#endif

// activate() on a vector (or on T itself): NaN passes through both clamps.
template <typename V>
inline V activate_vec(V v, V lo, V hi, Activation act) {
  if (act != Activation::None) v = v < lo ? lo : v;
  if (act == Activation::ReLU6) v = hi < v ? hi : v;
  return v;
}

// A run of `count` interior output pixels of one row (every tap in bounds) of a 3x3 depthwise conv (any stride and
// dilation), channels [c, c + NV * lanes): the 9 x NV weight vectors stay in registers across the run, so a pixel
// costs 9 input loads per vector. x0 is the first pixel's top-left input, xstep the input step per output pixel,
// off[k] tap k's offset from it; m is the first pixel's mid row (row stride ldm).
template <typename T, typename V, int NV>
inline void run3x3_block(const T* x0, int64_t count, int64_t xstep, const int64_t* off, const T* wt, const T* bias,
                         T* m, int64_t ldm, int64_t c, int64_t C, Activation act) {
  constexpr int L = simd::lanes<T, V>;
  const V lo = simd::broadcast<V>(T(0)), hi = simd::broadcast<V>(T(6));
  V w[9][NV], b[NV];
#pragma GCC unroll 9
  for (int k = 0; k < 9; ++k)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      w[k][v] = simd::load<V>(wt + k * C + c + v * L);
      simd::pin(w[k][v]);
    }
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) b[v] = bias ? simd::load<V>(bias + c + v * L) : lo;
  for (int64_t p = 0; p < count; ++p) {
    const T* xp = x0 + p * xstep + c;
    V acc[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[v] = b[v];
#pragma GCC unroll 9
    for (int k = 0; k < 9; ++k)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[v] = simd::fmadd(simd::load<V>(xp + off[k] + v * L), w[k][v], acc[v]);
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) simd::store(m + p * ldm + c + v * L, activate_vec(acc[v], lo, hi, act));
  }
}

// All C channels of such a run: blocks of two of the widest vectors where they fit in the registers (AVX-512: 18
// weights + 2 sums + 2 inputs of 32), then one, then the 32-byte vector, then single lanes.
template <typename T>
void run3x3(const T* x0, int64_t count, int64_t xstep, const int64_t* off, const T* wt, const T* bias, T* m,
            int64_t ldm, int64_t C, Activation act) {
  using V = simd::wide_t<T>;
  using V2 = simd::vec_t<T>;
  constexpr int64_t L = simd::lanes<T, V>, L2 = simd::lanes<T, V2>;
  int64_t c = 0;
  if constexpr (sizeof(V) == 64)
    for (; c + 2 * L <= C; c += 2 * L) run3x3_block<T, V, 2>(x0, count, xstep, off, wt, bias, m, ldm, c, C, act);
  for (; c + L <= C; c += L) run3x3_block<T, V, 1>(x0, count, xstep, off, wt, bias, m, ldm, c, C, act);
  if constexpr (L2 < L)
    for (; c + L2 <= C; c += L2) run3x3_block<T, V2, 1>(x0, count, xstep, off, wt, bias, m, ldm, c, C, act);
  for (; c < C; ++c) run3x3_block<T, T, 1>(x0, count, xstep, off, wt, bias, m, ldm, c, C, act);
}

// Depthwise for the output pixel rows [r0, r1) of the whole batch (row r = n * P + oh * OW + ow), NHWC input,
// into mid[r - r0][c] (row stride ldm). wt is the weight as [KH*KW][C], so the channel vectors of x and of the
// weight are both contiguous. Per border pixel the in-bounds taps are listed once (scratch: KH*KW taps and weight
// offsets, and the KH*KW fixed offsets of an interior pixel's taps), then each block of channels sums over them in registers
// and is stored once, activated. Pixels go outer and channels inner, so each tap reads one contiguous run of C
// values, which the hardware prefetchers follow (channels outer, 12 pixels inner ran 1.5-2x slower).
template <typename T>
void depthwise_rows_nhwc(const T* x, const T* wt, const T* bias, T* mid, int64_t ldm, const Conv2dShape& s,
                         int64_t r0, int64_t r1, Activation act, const T** taps, int64_t* tap_index,
                         int64_t* interior_off) {
  using V = simd::wide_t<T>;
  constexpr int L = simd::lanes<T, V>;
  constexpr int U = 4;  // vectors per channel block: 4 independent FMA chains
  const int64_t C = s.C, P = s.OH * s.OW, KK = s.KH * s.KW;
  const V lo = simd::broadcast<V>(T(0)), hi = simd::broadcast<V>(T(6));
  for (int64_t kh = 0; kh < s.KH; ++kh)
    for (int64_t kw = 0; kw < s.KW; ++kw) interior_off[kh * s.KW + kw] = (kh * s.dil_h * s.W + kw * s.dil_w) * C;
  // The output columns whose taps are all in bounds horizontally: [ow_in, ow_out).
  const int64_t ow_in = ceil_div(s.pad_w, s.stride_w);
  const int64_t last = s.W - 1 - (s.KW - 1) * s.dil_w + s.pad_w;
  const int64_t ow_out = last < 0 ? 0 : std::min(s.OW, last / s.stride_w + 1);
  // (n, oh, ow) of row r0, then stepped along without divisions.
  int64_t n = r0 / P, oh = r0 % P / s.OW, ow = r0 % s.OW;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t ih0 = oh * s.stride_h - s.pad_h, iw0 = ow * s.stride_w - s.pad_w;
    const bool rows_in = ih0 >= 0 && ih0 + (s.KH - 1) * s.dil_h < s.H;
    if (KK == 9 && rows_in && ow >= ow_in && ow < ow_out) {
      // 3x3, and this pixel and the next ones of its row up to ow_out are interior: one register-blocked run.
      const int64_t count = std::min(r1 - r, ow_out - ow);
      run3x3(x + ((n * s.H + ih0) * s.W + iw0) * C, count, s.stride_w * C, interior_off, wt, bias,
             mid + (r - r0) * ldm, ldm, C, act);
      r += count - 1;  // the loop's ++r makes it count
      ow += count - 1;
    } else {
      // Interior: tap t at x0 + interior_off[t], weight row t. Else the in-bounds taps, listed in taps / tap_index.
      const bool interior = rows_in && ow >= ow_in && ow < ow_out;
      const T* x0 = interior ? x + ((n * s.H + ih0) * s.W + iw0) * C : nullptr;
      int nt = static_cast<int>(KK);
      if (!interior) {
        nt = 0;
        for (int64_t kh = 0; kh < s.KH; ++kh) {
          const int64_t ih = ih0 + kh * s.dil_h;
          if (ih < 0 || ih >= s.H) continue;
          for (int64_t kw = 0; kw < s.KW; ++kw) {
            const int64_t iw = iw0 + kw * s.dil_w;
            if (iw < 0 || iw >= s.W) continue;
            taps[nt] = x + ((n * s.H + ih) * s.W + iw) * C;
            tap_index[nt++] = (kh * s.KW + kw) * C;
          }
        }
      }
      auto xp = [&](int t) { return interior ? x0 + interior_off[t] : taps[t]; };
      auto wp = [&](int t) { return wt + (interior ? t * C : tap_index[t]); };
      T* m = mid + (r - r0) * ldm;
      int64_t c = 0;
      for (; c + U * L <= C; c += U * L) {
        V acc[U];
        for (int u = 0; u < U; ++u) acc[u] = bias ? simd::load<V>(bias + c + u * L) : lo;
        for (int t = 0; t < nt; ++t) {
          const T* xt = xp(t) + c;
          const T* wt_ = wp(t) + c;
          for (int u = 0; u < U; ++u)
            acc[u] = simd::fmadd(simd::load<V>(xt + u * L), simd::load<V>(wt_ + u * L), acc[u]);
        }
        for (int u = 0; u < U; ++u) simd::store(m + c + u * L, activate_vec(acc[u], lo, hi, act));
      }
      for (; c + L <= C; c += L) {
        V acc = bias ? simd::load<V>(bias + c) : lo;
        for (int t = 0; t < nt; ++t) acc = simd::fmadd(simd::load<V>(xp(t) + c), simd::load<V>(wp(t) + c), acc);
        simd::store(m + c, activate_vec(acc, lo, hi, act));
      }
      for (; c < C; ++c) {
        T acc = bias ? bias[c] : T(0);
        for (int t = 0; t < nt; ++t) acc = simd::fmadd(xp(t)[c], wp(t)[c], acc);
        m[c] = activate(acc, act);
      }
    }
    if (++ow == s.OW) {
      ow = 0;
      if (++oh == s.OH) oh = 0, ++n;
    }
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

// The pointwise GEMM's reduction over C runs in blocks of kKC channels, so that one packed weight block (kKC x NR,
// 32 KiB of floats under AVX-512) stays in L1 while every micro-tile of the strip reads it; the partial sums of a
// block wait in a private tile buffer (GemmTile::part). Per weight panel the blocks go in order, then the next panel.
constexpr int64_t kKC = 256;

}  // namespace

template <typename T>
void dsconv2d_forward(const T* x, const T* dw_weight, const T* dw_bias, const T* pw_weight, const T* pw_bias, T* out,
                      const Conv2dShape& s, int64_t C_out, Activation act_dw, Activation act_pw, Layout layout) {
  const int64_t C = s.C, P = s.OH * s.OW;
  const bool nhwc = layout == Layout::NHWC;
  const int threads = omp_get_max_threads();

  // The pointwise weight, packed once into the micro-kernel's panel order [panel][c][lane], zero-padded past C_out,
  // so that a block of kKC channels of one panel is contiguous.
  const int64_t panel = nhwc ? NR : MR;
  const int64_t panels = ceil_div(C_out, panel);
  // Filled by the threads before the strips (below): C = 1024 is 4 MiB, whose serial copy (and zero fill) took a
  // sixth of the layer's time at 2 threads.
  std::unique_ptr<T[]> packed(new T[static_cast<size_t>(panels * C * panel)]);

  // Strips. NHWC output rows of consecutive images are contiguous, so a strip is any run of pixel rows of the
  // whole batch (MobileNet's 7x7 and 14x14 layers would otherwise leave one short strip per image, each
  // re-reading the whole pointwise weight). The batch's micro-tile rows (`units`) are split evenly over the strips,
  // whose count is a multiple of the thread count where that keeps strips of at least two units, so only the
  // batch's last tile is partial and the threads' shares differ by at most a unit per strip (fixed-size strips left
  // one thread 216 rows and the other 176 at C = 1024 7x7). TP is the longest strip.
  // NCHW output is contiguous only within an image: strips are per image, TP a multiple of lcm(MR, NR) (48 for
  // 6 x 16 tiles, 96 for 12 x 32).
  const int64_t rows = nhwc ? s.N * P : P;
  const int64_t quantum = nhwc ? MR : std::lcm(MR, NR);
  const int64_t tp_max = std::max<int64_t>(kStripBytes / static_cast<int64_t>(sizeof(T)) / C / quantum, 1) * quantum;
  const int64_t units = ceil_div(rows, MR);
  int64_t strips = ceil_div(rows, tp_max);
  if (nhwc) {
    const int64_t balanced = ceil_div(strips, threads) * threads;
    if (units >= 2 * balanced) strips = balanced;
  }
  int64_t TP;
  if (nhwc) {
    strips = std::min(strips, units);
    TP = std::min(ceil_div(units, strips) * MR, rows);
  } else {
    TP = std::min(ceil_div(ceil_div(rows, strips), quantum) * quantum, rows);
    strips = ceil_div(rows, TP);
  }
  const int64_t tasks = nhwc ? strips : s.N * strips;

  std::vector<T> dw_t;
  if (nhwc) {
    const int64_t KK = s.KH * s.KW;
    dw_t.resize(static_cast<size_t>(KK * C));
    for (int64_t c = 0; c < C; ++c)
      for (int64_t k = 0; k < KK; ++k) dw_t[k * C + c] = dw_weight[c * KK + k];
  }

  // NCHW: mid rows padded to whole NR vectors, read (never stored) past the strip by the last micro-tiles.
  // NHWC: MR spare pixel rows, read (never stored) by the last partial micro-tile.
  // Both: one more cache line per row, so that rows 4 KiB apart do not all fall in one L1 set.
  constexpr int64_t line = simd::line_elems<T>;
  const int64_t ldm = (nhwc ? ceil_div(C, line) * line : ceil_div(TP, NR) * NR) + line;
  const size_t mid_size = static_cast<size_t>(nhwc ? (TP + MR) * ldm : C * ldm);

#pragma omp parallel
  {
    std::vector<T> mid(mid_size, T(0));
    // One panel's partial sums, a tile after another.
    const int64_t part_tiles = C > kKC ? (nhwc ? ceil_div(TP, MR) : ceil_div(TP, NR)) : 0;
    std::vector<T> part(static_cast<size_t>(part_tiles * MR * NR));
    std::vector<const T*> taps(static_cast<size_t>(s.KH * s.KW));
    std::vector<int64_t> tap_index(static_cast<size_t>(s.KH * s.KW)), interior_off(s.KH * s.KW);
#pragma omp for schedule(static)
    for (int64_t jp = 0; jp < panels; ++jp)
      pack_panel(pw_weight, C_out, C, C, panel, jp, packed.get() + jp * C * panel);
    // (the implicit barrier: every panel is packed before any strip reads one)
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t n = nhwc ? 0 : t / strips;
      const int64_t st = t % strips;
      const int64_t pb = nhwc ? st * units / strips * MR : st * TP;
      const int64_t pe = nhwc ? std::min(rows, (st + 1) * units / strips * MR) : std::min(rows, pb + TP), np = pe - pb;
      if (nhwc) {
        depthwise_rows_nhwc(x, dw_t.data(), dw_bias, mid.data(), ldm, s, pb, pe, act_dw, taps.data(), tap_index.data(),
                            interior_off.data());
      } else {
        depthwise_strip_nchw(x, dw_weight, dw_bias, mid.data(), ldm, s, n, pb, pe, act_dw);
      }
      for (int64_t jp = 0; jp < panels; ++jp) {
        for (int64_t k0 = 0; k0 < C; k0 += kKC) {
          GemmTile<T> tile;
          tile.K = std::min(kKC, C - k0);
          tile.accumulate = k0 > 0;
          tile.finish = k0 + tile.K == C;
          tile.act = act_pw;
          const T* wp = packed.get() + (jp * C + k0) * panel;
          T* part_tile = part.data();  // null when the reduction is a single block
          if (nhwc) {
            // out[p][o] = sum_c mid[p][c] W[o][c]: rows = pixels, columns = this panel's output channels.
            const int64_t j0 = jp * NR;
            tile.nr = static_cast<int>(std::min<int64_t>(NR, C_out - j0));
            tile.row_bias = nullptr;
            tile.col_bias = pw_bias ? pw_bias + j0 : nullptr;
            for (int64_t i0 = 0; i0 < np; i0 += MR) {
              tile.mr = static_cast<int>(std::min<int64_t>(MR, np - i0));
              tile.part = part_tile + i0 / MR * (MR * NR);
              gemm_tile(tile, mid.data() + i0 * ldm + k0, ldm, 1, wp, NR, out + (pb + i0) * C_out + j0, C_out);
            }
          } else {
            // out[o][p] = sum_c W[o][c] mid[c][p]: rows = this panel's output channels, columns = pixels.
            const int64_t i0 = jp * MR;
            tile.mr = static_cast<int>(std::min<int64_t>(MR, C_out - i0));
            tile.row_bias = pw_bias ? pw_bias + i0 : nullptr;
            tile.col_bias = nullptr;
            T* out_rows = out + (n * C_out + i0) * P + pb;
            for (int64_t j0 = 0; j0 < np; j0 += NR) {
              tile.nr = static_cast<int>(std::min<int64_t>(NR, np - j0));
              tile.part = part_tile + j0 / NR * (MR * NR);
              gemm_tile(tile, wp, 1, MR, mid.data() + k0 * ldm + j0, ldm, out_rows + j0, P);
            }
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
