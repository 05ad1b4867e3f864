// Depthwise convolution on the CPU.
//
// NCHW, kernels three wide (MobileNet's), float, AVX2 without AVX-512: blocks of 16 planes interleaved into a
// channels-last scratch, then the NHWC strips below (nchw_strips; the forward only on planes up to 64 x 64).
// Other NCHW problems: one thread owns whole (n, c) planes, which fit in L2, and vectorizes along the output row.
// With AVX-512 (float, stride 1 or 2 along w) rows go in 16-lane chunks whose borders and tails are masks, and 3x3
// kernels reuse each loaded input row for every output row of a register tile (planes::PlaneKernel). Otherwise each row splits
// into an interior, where every tap is in bounds and the loop has no checks, and a few border columns done with
// checks; 3x3 stride 1/2 interiors get a fused loop that keeps all nine taps in one pass.
// NHWC: vectorizes over channels. Which taps of a pixel are in bounds is decided once per row and column from
// small tables, so the channel loop has no checks. The weight is transposed to [KH*KW][C] so that one tap's
// weights for consecutive channels are contiguous.
// No output element is written by two threads, so there are no atomics and the results are deterministic.
#include "cpu/depthwise_conv2d.h"
#include "cpu/simd.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace pyvl {
namespace cpu {
namespace {

inline int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}
inline int64_t ceil_div(int64_t a, int64_t b) {  // b > 0
  return -floor_div(-a, b);
}

// Outputs o with i = o*stride - pad + k*dil inside [0, in_size), as the half-open range [lo, hi) within [0, out_size).
inline void valid_outputs(int64_t k, int64_t in_size, int64_t out_size, int64_t stride, int64_t pad, int64_t dil,
                          int64_t& lo, int64_t& hi) {
  const int64_t off = k * dil - pad;
  lo = std::min(out_size, std::max<int64_t>(0, ceil_div(-off, stride)));
  hi = std::min<int64_t>(out_size, floor_div(in_size - 1 - off, stride) + 1);
  if (hi < lo) hi = lo;
}

// For every position along one axis, the (kernel index, source position) pairs that contribute to it.
// Built once per call so the per-pixel work in the NHWC kernels never tests bounds or divisibility.
struct TapTable {
  int64_t K = 0;
  std::vector<int64_t> count, k, pos;  // count[o]; k and pos at [o*K + j], j < count[o]
};

// Forward taps: output o reads input o*stride - pad + k*dil.
TapTable forward_taps(int64_t out_size, int64_t in_size, int64_t K, int64_t stride, int64_t pad, int64_t dil) {
  TapTable t;
  t.K = K;
  t.count.assign(out_size, 0);
  t.k.resize(out_size * K);
  t.pos.resize(out_size * K);
  for (int64_t o = 0; o < out_size; ++o) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = o * stride - pad + k * dil;
      if (i < 0 || i >= in_size) continue;
      const int64_t j = t.count[o]++;
      t.k[o * K + j] = k;
      t.pos[o * K + j] = i;
    }
  }
  return t;
}

// Transposed taps: input i receives from output o where o*stride = i + pad - k*dil.
TapTable transposed_taps(int64_t in_size, int64_t out_size, int64_t K, int64_t stride, int64_t pad, int64_t dil) {
  TapTable t;
  t.K = K;
  t.count.assign(in_size, 0);
  t.k.resize(in_size * K);
  t.pos.resize(in_size * K);
  for (int64_t i = 0; i < in_size; ++i) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t q = i + pad - k * dil;
      if (q < 0 || q % stride != 0 || q / stride >= out_size) continue;
      const int64_t j = t.count[i]++;
      t.k[i * K + j] = k;
      t.pos[i * K + j] = q / stride;
    }
  }
  return t;
}

// ---------------------------------------------------------------------------------------------------------------
// NCHW

// Geometry of one plane-to-plane correlation. Unlike Conv2dShape the padding may be negative: backward_input
// at stride 1 runs this with flipped weights and padding dil*(K-1) - pad.
struct PlaneGeom {
  int64_t H, W, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw;
};


// o[j] += w * x[j*SW] for j < n; SW = 0 means the stride is the runtime value `sw`.
template <typename T, int SW>
inline void axpy_strided(T* __restrict o, const T* __restrict x, T w, int64_t n, int64_t sw) {
  const int64_t st = SW > 0 ? SW : sw;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) o[j] += w * x[j * st];
}

template <typename T>
inline void axpy_any(T* o, const T* x, T w, int64_t n, int64_t sw) {
  if (sw == 1) axpy_strided<T, 1>(o, x, w, n, 1);
  else if (sw == 2) axpy_strided<T, 2>(o, x, w, n, 2);
  else axpy_strided<T, 0>(o, x, w, n, sw);
}

// All nine taps of a 3x3, dilation 1 kernel in one pass over the row, so each output is stored once.
template <typename T, int SW>
inline void row3x3(T* __restrict o, const T* __restrict r0, const T* __restrict r1, const T* __restrict r2,
                   const T* w, T b, int64_t n) {
  const T w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5], w6 = w[6], w7 = w[7], w8 = w[8];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = j * SW;
    T acc = b + w0 * r0[i];
    acc += w1 * r0[i + 1];
    acc += w2 * r0[i + 2];
    acc += w3 * r1[i];
    acc += w4 * r1[i + 1];
    acc += w5 * r1[i + 2];
    acc += w6 * r2[i];
    acc += w7 * r2[i + 1];
    acc += w8 * r2[i + 2];
    o[j] = acc;
  }
}

template <typename T>
inline T border_tap_sum(const T* x, const T* w, T b, const PlaneGeom& g, int64_t ih0, int64_t kh_lo, int64_t kh_hi,
                        int64_t ow) {
  T acc = b;
  const int64_t iw0 = ow * g.sw - g.pw;
  for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
    const T* xr = x + (ih0 + kh * g.dh) * g.W;
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      const int64_t iw = iw0 + kw * g.dw;
      if (iw >= 0 && iw < g.W) acc += w[kh * g.KW + kw] * xr[iw];
    }
  }
  return acc;
}

// out plane [OH, OW] = correlation of x plane [H, W] with w [KH, KW] + b.
template <typename T>
void correlate_plane(const T* x, const T* w, T b, T* out, const PlaneGeom& g) {
  // Interior columns: every kw lands inside the row.
  int64_t ow_lo, ow_hi, tmp_lo, tmp_hi;
  valid_outputs(0, g.W, g.OW, g.sw, g.pw, g.dw, ow_lo, ow_hi);
  valid_outputs(g.KW - 1, g.W, g.OW, g.sw, g.pw, g.dw, tmp_lo, tmp_hi);
  ow_lo = std::max(ow_lo, tmp_lo);
  ow_hi = std::max(ow_lo, std::min(ow_hi, tmp_hi));
  const int64_t n_in = ow_hi - ow_lo;
  const bool fused3x3 = g.KH == 3 && g.KW == 3 && g.dh == 1 && g.dw == 1 && (g.sw == 1 || g.sw == 2);

  for (int64_t oh = 0; oh < g.OH; ++oh) {
    T* orow = out + oh * g.OW;
    const int64_t ih0 = oh * g.sh - g.ph;
    int64_t kh_lo = 0, kh_hi = g.KH;
    while (kh_lo < g.KH && ih0 + kh_lo * g.dh < 0) ++kh_lo;
    while (kh_hi > kh_lo && ih0 + (kh_hi - 1) * g.dh >= g.H) --kh_hi;

    if (n_in > 0) {
      const int64_t col0 = ow_lo * g.sw - g.pw;  // input column of tap kw = 0 at ow_lo; >= 0 by construction
      if (fused3x3 && kh_lo == 0 && kh_hi == 3) {
        const T* r0 = x + ih0 * g.W + col0;
        if (g.sw == 1) row3x3<T, 1>(orow + ow_lo, r0, r0 + g.W, r0 + 2 * g.W, w, b, n_in);
        else row3x3<T, 2>(orow + ow_lo, r0, r0 + g.W, r0 + 2 * g.W, w, b, n_in);
      } else {
        std::fill(orow + ow_lo, orow + ow_hi, b);
        for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
          const T* xr = x + (ih0 + kh * g.dh) * g.W + col0;
          for (int64_t kw = 0; kw < g.KW; ++kw)
            axpy_any(orow + ow_lo, xr + kw * g.dw, w[kh * g.KW + kw], n_in, g.sw);
        }
      }
    }
    // Border columns (a few per row): checked taps.
    for (int64_t ow = 0; ow < ow_lo; ++ow) orow[ow] = border_tap_sum(x, w, b, g, ih0, kh_lo, kh_hi, ow);
    for (int64_t ow = ow_hi; ow < g.OW; ++ow) orow[ow] = border_tap_sum(x, w, b, g, ih0, kh_lo, kh_hi, ow);
  }
}

// Small planes (MobileNet's 7x7 to 56x56) are mostly border, and their rows are too short to fill vectors (a 7-wide
// row is one partial vector per tap). So the plane is copied into its zero-padded stride phases: phase (a, b) holds
// the padded rows a, a + S_h, ... and columns b, b + S_w, ..., each Hq x Wq. Output (oh, ow) then reads tap (kh, kw)
// from phase ((kh*dh) % S_h, (kw*dw) % S_w) at row oh + (kh*dh) / S_h, column ow + (kw*dw) / S_w: along the flat index
// g = oh*Wq + ow every tap is one contiguous run at a fixed offset, so the whole plane vectorizes as one long row
// (Wq - OW junk columns per row are computed and dropped), any stride needing no strided loads. The padding cells are
// zeroed once per thread and never written, since every plane of a call has the same geometry.
constexpr int64_t kPadCopyMaxWidth = 64;

template <typename T>
class PhasePlanes {
 public:
  using V = simd::vec_t<T>;
  static constexpr int64_t L = simd::lanes<T, V>;
  static constexpr int kUnroll = 4;  // independent accumulators per step, to cover the FMA latency

  explicit PhasePlanes(const PlaneGeom& g) : g_(g) {
    Hq_ = (g.H + 2 * g.ph + g.sh - 1) / g.sh;
    Wq_ = (g.W + 2 * g.pw + g.sw - 1) / g.sw;
    G_ = g.OH * Wq_;
    G_pad_ = (G_ + kUnroll * L - 1) / (kUnroll * L) * (kUnroll * L);
    // Reads reach at most G_pad - 1 plus the largest tap offset, which stays below Hq*Wq + Wq; the slack covers it.
    phase_stride_ = Hq_ * Wq_ + Wq_ + kUnroll * L;
    phases_.assign(g.sh * g.sw * phase_stride_, T(0));
    grid_.resize(G_pad_);
    for (int64_t kh = 0; kh < g.KH; ++kh)
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t r = kh * g.dh, c = kw * g.dw;
        tap_offset_.push_back(((r % g.sh) * g.sw + c % g.sw) * phase_stride_ + (r / g.sh) * Wq_ + c / g.sw);
      }
  }

  // Stride 1 only: for strided planes the element-wise scatter into phases cost more than it saved (measured at
  // 14x14..56x56 stride 2), so those keep the zero-padded copy below.
  static bool applies(const PlaneGeom& g) {
    return g.W <= kPadCopyMaxWidth && g.ph >= 0 && g.pw >= 0 && g.sh == 1 && g.sw == 1;
  }

  void correlate(const T* x, const T* w, T b, T* out) {
    scatter(x);
    const int64_t KK = g_.KH * g_.KW;
    const V bv = simd::broadcast<V>(b);
    for (int64_t i = 0; i < G_pad_; i += kUnroll * L) {
      V acc[kUnroll];
      for (int u = 0; u < kUnroll; ++u) acc[u] = bv;
      for (int64_t k = 0; k < KK; ++k) {
        const V wv = simd::broadcast<V>(w[k]);
        const T* src = phases_.data() + tap_offset_[k] + i;
#pragma GCC unroll 4
        for (int u = 0; u < kUnroll; ++u) acc[u] = simd::fmadd(wv, simd::load<V>(src + u * L), acc[u]);
      }
#pragma GCC unroll 4
      for (int u = 0; u < kUnroll; ++u) simd::store(grid_.data() + i + u * L, acc[u]);
    }
    for (int64_t oh = 0; oh < g_.OH; ++oh)
      std::copy(grid_.data() + oh * Wq_, grid_.data() + oh * Wq_ + g_.OW, out + oh * g_.OW);
  }

 private:
  void scatter(const T* x) {
    for (int64_t h = 0; h < g_.H; ++h)
      std::copy(x + h * g_.W, x + (h + 1) * g_.W, phases_.data() + (h + g_.ph) * Wq_ + g_.pw);
  }

  PlaneGeom g_;
  int64_t Hq_, Wq_, G_, G_pad_, phase_stride_;
  std::vector<T> phases_, grid_;
  std::vector<int64_t> tap_offset_;
};

// One thread's plane kernel: small stride-1 planes through PhasePlanes; other small padded planes copied into a
// zero-padded scratch plane so every row runs the check-free interior loop; large planes in place, where the border
// is a small fraction of the work.
template <typename T>
class PlaneCorrelator {
 public:
  explicit PlaneCorrelator(const PlaneGeom& g) : g_(g) {
    if (PhasePlanes<T>::applies(g)) phases_.emplace_back(g);
    pad_copy_ = phases_.empty() && g.W <= kPadCopyMaxWidth && g.ph >= 0 && g.pw >= 0 && (g.ph > 0 || g.pw > 0);
    if (pad_copy_) {
      padded_ = g;
      padded_.H = g.H + 2 * g.ph;
      padded_.W = g.W + 2 * g.pw;
      padded_.ph = padded_.pw = 0;
      scratch_.assign(padded_.H * padded_.W, T(0));  // the border stays zero; each plane rewrites the interior
    }
  }
  void operator()(const T* x, const T* w, T b, T* out) {
    if (!phases_.empty()) {
      phases_.front().correlate(x, w, b, out);
    } else if (pad_copy_) {
      for (int64_t h = 0; h < g_.H; ++h)
        std::copy(x + h * g_.W, x + (h + 1) * g_.W, scratch_.data() + (h + g_.ph) * padded_.W + g_.pw);
      correlate_plane(scratch_.data(), w, b, out, padded_);
    } else {
      correlate_plane(x, w, b, out, g_);
    }
  }

 private:
  PlaneGeom g_, padded_{};
  bool pad_copy_ = false;
  std::vector<T> scratch_;
  std::vector<PhasePlanes<T>> phases_;  // empty or one
};

// ---------------------------------------------------------------------------------------------------------------
// NCHW, float, AVX-512 or AVX2 (stride 1 or 2 along w; any kernel, padding, dilation and stride along h)
//
// Output rows go in chunks of one vector (16 lanes under AVX-512, 8 under AVX2). Which lanes of a chunk a tap (kw)
// may read is a mask computed once per call for every (chunk, kw): lanes past the row's end and lanes whose input
// column falls in the padding are off. The loads are masked (no access, no fault, beyond the row; zeros in the off
// lanes). Under AVX-512 so is the FMA (an off lane keeps its sum, so a padding tap contributes nothing even where
// the weight is inf or NaN); AVX2 has no masked FMA, and there a padding tap adds weight * 0, as zero padding does
// (the same as PyTorch's, and it differs only for a non-finite weight). Kernel rows in the padding are skipped per
// output row. So borders, short rows (7 to 56 wide in MobileNet) and the row tail run the same loop as the
// interior, with no scalar code. Under AVX-512 the planes are read in place; under AVX2 each plane is copied into
// a zero-padded scratch plane first and the loads are plain (vmaskmovps is slow: see the AVX2 Isa below).
//
// At stride 2 a chunk's taps are the even elements of two vectors of consecutive inputs: two masked loads and a
// two-source permute (vpermt2ps; under AVX2 a shuffle and a lane permute) instead of a gather.
//
// A tile is R output rows x CB chunks = at most 8 accumulators, enough independent FMA chains to cover the FMA
// latency; short rows stack up to 8 rows per tile. 3x3 kernels with stride_h = stride_w and dilation 1 (MobileNet's)
// take tile3 instead, which loads each input row once per (kw, chunk) for all the tile's output rows it feeds.
// Single-threaded per plane against the AVX2 plane kernels above (which this path replaces where it applies), on a
// 2-core Sapphire Rapids VM, 2026-12-02: stride 1 at 7x7 / 14 / 28 / 56 / 112: 1.7 / 2.0 / 1.9 / 1.9 / 2.1x;
// stride 2 at 14 / 28 / 56 / 112: 2.4 / 2.3 / 1.8 / 1.4x. A first version without row reuse, with the masks
// reloaded per FMA, was 0.75-1.1x at stride 1: a 64-byte unaligned load splits over two cache lines, so one zmm
// load per FMA saturates the load ports. Under AVX2 on a 2-core AMD EPYC Zen 3 VM (C++ harness, batch 8, 2 threads,
// fastest of 4 interleaved rounds against the kernels replaced; that VM's rounds scatter by 15-30%), MobileNetV1's
// shapes where planes::takes() and takes_weight_grad() apply: forward at stride 2 1.35-1.7x (56x56, 28x28, 14x14),
// weight gradient 1.09-5.05x (28x28 stride 2 5.05, 14x14 stride 2 4.65).
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define PYVL_PLANE_KERNELS 1
namespace planes {

// The vector operations the plane kernels are written in, for the build's ISA.
#if defined(__AVX512F__)
struct Isa {
  using V = __m512;
  using M = __mmask16;
  static constexpr int kLanes = 16;
  // tile3: at most this many accumulators and chunks per tile (32 registers hold 16 sums and the nine weights).
  static constexpr int kMaxAcc3 = 16, kMaxChunks3 = 8;
  static M mask(uint32_t bits) { return M(bits); }
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V zero() { return _mm512_setzero_ps(); }
  static V load(M m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  // Masked loads cost what plain ones do: the kernels read the planes in place, every load masked.
  static constexpr bool kMaskedOnly = true;
  static V load_into(V v, M m, const float* p) { return _mm512_mask_loadu_ps(v, m, p); }  // v's lanes off in m kept
  static void store(M m, int, float* p, V v) { _mm512_mask_storeu_ps(p, m, v); }
  static V fma(V w, V x, V acc) { return _mm512_fmadd_ps(w, x, acc); }
  static V fma(V w, V x, V acc, M m) { return _mm512_mask3_fmadd_ps(w, x, acc, m); }
  // The even elements of the 2*kLanes floats a:b.
  static V even(V a, V b) {
    return _mm512_permutex2var_ps(a, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30), b);
  }
  static V halves(V a, V b) { return _mm512_mask_blend_ps(M(0xFF00), a, b); }  // low half of a, high half of b
  // Lanes [8, 8 + n) of v to p[0, n); m is those lanes' mask.
  static void store_high(M m, int, float* p, V v) { _mm512_mask_storeu_ps(p - 8, m, v); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
};
#else
struct Isa {
  using V = __m256;
  using M = __m256i;
  static constexpr int kLanes = 8;
  // 16 registers: tile3 keeps 8 sums, the weights as memory operands.
  static constexpr int kMaxAcc3 = 8, kMaxChunks3 = 2;
  static M mask(uint32_t bits) {
    alignas(32) int32_t m[8];
    for (int l = 0; l < 8; ++l) m[l] = (bits >> l) & 1 ? -1 : 0;
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(m));
  }
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V zero() { return _mm256_setzero_ps(); }
  static V load(M m, const float* p) { return _mm256_maskload_ps(p, m); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  // vmaskmovps is slow where AVX-512's masked loads are not: on a 2-core AMD EPYC Zen 3 VM, with masked loads
  // for every tap the C 64 112x112 stride-2 forward (input from main memory) ran at 0.45x the kernels it was to
  // replace, 1.1x with plain loads in their place; with masked loads only in the border chunks, 0.3-0.6x. So
  // under AVX2 each plane is first copied into a zero-padded scratch plane wide enough for every chunk's loads
  // (the copy reads the plane in address order), and the tiles load plainly from it; only pair()'s planes, of
  // at most 4 columns, are read in place with vmaskmovps. Also rejected: the border loads as the in-row vector
  // nearest to them, moved into place by vpermps and masked by vandps (2x slower than vmaskmovps in cache), and
  // one branch per load between the kinds in the unrolled tiles (2-3x slower than either kind alone).
  static constexpr bool kMaskedOnly = false;
  static V load_into(V v, M m, const float* p) { return _mm256_or_ps(v, _mm256_maskload_ps(p, m)); }  // v zero in m
  // The first n lanes of v to p: a plain store when n = 8, else 4-, 2- and 1-lane stores (vmaskmovps stores
  // measured several times slower than plain ones on AMD processors).
  static void store(M, int n, float* p, V v) {
    if (n == 8) return _mm256_storeu_ps(p, v);
    __m128 h = _mm256_castps256_ps128(v);
    if (n & 4) {
      _mm_storeu_ps(p, h);
      h = _mm256_extractf128_ps(v, 1);
      p += 4;
    }
    if (n & 2) {
      _mm_storel_pi(reinterpret_cast<__m64*>(p), h);
      h = _mm_movehl_ps(h, h);
      p += 2;
    }
    if (n & 1) _mm_store_ss(p, h);
  }
  static V fma(V w, V x, V acc) { return _mm256_fmadd_ps(w, x, acc); }
  static V fma(V w, V x, V acc, M) { return _mm256_fmadd_ps(w, x, acc); }  // off lanes read zeros (see above)
  static V even(V a, V b) {
    // [a0 a2 b0 b2 | a4 a6 b4 b6], then the 64-bit pairs reordered to [a0 a2 a4 a6 | b0 b2 b4 b6]
    const __m256 t = _mm256_shuffle_ps(a, b, 0x88);
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(t), 0xD8));
  }
  static V halves(V a, V b) { return _mm256_blend_ps(a, b, 0xF0); }
  static void store_high(M, int n, float* p, V v) {  // lanes [4, 4 + n) of v to p[0, n), n <= 4
    store(M{}, n, p, _mm256_castps128_ps256(_mm256_extractf128_ps(v, 1)));
  }
  static float sum(V v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
  }
};
#endif

using V = Isa::V;
using M = Isa::M;
constexpr int kLanes = Isa::kLanes;
constexpr int kMaxAcc = 8;

// How a tile loads (see the ISAs above): plainly from a zero-padded copy of the plane, or masked in place.
enum LoadKind { kPlain, kMasked };

template <LoadKind K>
__attribute__((always_inline)) inline V load(M m, const float* p) {
  if constexpr (K == kPlain) return Isa::load(p);
  else return Isa::load(m, p);
}

struct ChunkTap {
  int64_t col;    // input column of lane 0 (may be negative: those lanes are masked off)
  M lo, hi, fma;  // load masks for elements [0, L) and [L, 2L) from col; lanes that accumulate
};

template <int S>
class PlaneKernel {
 public:
  explicit PlaneKernel(const PlaneGeom& in) : g_(in), src_(in), nchunks_((in.OW + kLanes - 1) / kLanes) {
    pad_ = !Isa::kMaskedOnly && !pair_applies(in) && in.ph >= 0 && in.pw >= 0;
    if (pad_) {
      // The scratch plane: ph zero rows above the plane and enough below for the last output row; pw zero columns
      // left of it and, right of it, enough for the last chunk's loads (S vectors from its last tap's column).
      g_.ph = g_.pw = 0;
      g_.H = std::max(in.ph + in.H, (in.OH - 1) * in.sh + (in.KH - 1) * in.dh + 1);
      g_.W = std::max(in.pw + in.W, nchunks_ * kLanes * S + (in.KW - 1) * in.dw);
      scratch_.assign(g_.H * g_.W, 0.f);  // the padding stays zero; each plane rewrites the interior
    }
    const PlaneGeom& g = g_;
    taps_.resize(nchunks_ * g.KW);
    for (int64_t c = 0; c < nchunks_; ++c)
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        ChunkTap& t = taps_[c * g.KW + kw];
        t.col = c * kLanes * S - g.pw + kw * g.dw;
        uint32_t lo = 0, hi = 0, fma = 0;
        for (int l = 0; l < kLanes; ++l) {
          const int64_t ow = c * kLanes + l, iw = t.col + int64_t(l) * S;
          if (ow >= g.OW || iw < 0 || iw >= g.W) continue;
          fma |= 1u << l;
          const int e = l * S;  // element of the load window
          if (e < kLanes) lo |= 1u << e;
          else hi |= 1u << (e - kLanes);
        }
        t.lo = Isa::mask(lo);
        t.hi = Isa::mask(hi);
        t.fma = Isa::mask(fma);
        if (c == 0 && kw < 3) {  // pair()'s masks: plane 0's in the low half, plane 1's in the high half
          pair_hi_[kw] = Isa::mask(lo << kLanes / 2);
          pair_fma_[kw] = Isa::mask(fma | fma << kLanes / 2);
        }
      }
    for (int64_t c = 0; c < nchunks_; ++c) {
      const uint32_t n = static_cast<uint32_t>(std::min<int64_t>(kLanes, g.OW - c * kLanes));
      store_mask_.push_back({Isa::mask((1u << n) - 1), static_cast<int>(n)});
      if (c == 0) pair_store_hi_ = Isa::mask(((1u << n) - 1) << kLanes / 2);
    }
    cb_ = static_cast<int>(std::min<int64_t>(nchunks_, kMaxAcc));
    rows_ = kMaxAcc / cb_;
    k3_ = is_3x3(g);
    cb3_ = static_cast<int>(std::min<int64_t>(nchunks_, Isa::kMaxChunks3));
    // at most kMaxAcc3 accumulators, R and CB among dispatch3's tiles
    rows3_ = Isa::kMaxAcc3 == 16 ? (cb3_ <= 2 ? 8 : cb3_ <= 4 ? 4 : 2) : (cb3_ <= 1 ? 8 : 4);
  }

  // 3x3, dilation 1, stride_h = stride_w: tile3's case.
  static bool is_3x3(const PlaneGeom& g) { return g.KH == 3 && g.KW == 3 && g.sh == S && g.dh == 1 && g.dw == 1; }
  // Whether pair() applies: tile3's case with output rows of at most 8 columns.
  static bool pair_applies(const PlaneGeom& g) { return is_3x3(g) && g.OW <= kLanes / 2; }

  // The weight gradient of one plane in tile3's case: acc[kh*3 + kw] += sum over outputs of g * x-tap, with 16-lane
  // chunks of g's rows against the same masked tap loads as the forward (nine vector sums, reduced at the end).
  // C++ harness, batch 8, 2 threads, 2-core Sapphire Rapids VM, medians of 4 interleaved runs against
  // backward_weight_nchw's other paths (flat dots at stride 1 and W <= 64, row dots), MobileNetV1's 9 shapes:
  // 1.34-4.49x (C 256 28x28 s2 4.49, C 512 14x14 s2 3.38, C 128 56x56 2.29, C 1024 7x7 1.69, C 32 112x112 1.34).
  void weight_grad3(const float* x, const float* g, float* acc) {
    if (!pad_) return weight_grad3_of<kMasked>(x, g, g_.OW, acc);
    copy_in(x);
    const int64_t gw = nchunks_ * kLanes;
    if (gscratch_.empty()) gscratch_.assign(g_.OH * gw, 0.f);  // grad_out's rows, zero past OW (never written)
    for (int64_t oh = 0; oh < g_.OH; ++oh)
      std::copy(g + oh * g_.OW, g + (oh + 1) * g_.OW, gscratch_.data() + oh * gw);
    weight_grad3_of<kPlain>(scratch_.data(), gscratch_.data(), gw, acc);
  }

  // Two planes at once, for rows of at most 8 outputs (MobileNet's 7x7 layer, and 14x14 at stride 2), which one
  // plane per vector runs at 7 of 16 lanes: lanes [0, 8) hold a row of plane 0 and lanes [8, 16) the same row of
  // plane 1, each with its own weights and bias. Plane 1's half is a second masked load, 8 lanes below its row
  // (stride 1), or the odd half of the stride-2 permute, whose second source is plane 1's row instead of the
  // continuation of plane 0's. C++ harness, batch 8, 2 threads, 2-core Sapphire Rapids VM, medians of 8
  // interleaved runs against one plane per vector: C 1024 7x7 1.83x (156 -> 85 us), C 512 14x14 stride 2 2.3x
  // (156 -> 68 us).
  void pair(const float* x0, const float* x1, const float* w0, const float* w1, float b0, float b1, float* out0,
            float* out1) {
    const V bv = Isa::halves(Isa::set1(b0), Isa::set1(b1));
    V wv[9];
    for (int k = 0; k < 9; ++k) wv[k] = Isa::halves(Isa::set1(w0[k]), Isa::set1(w1[k]));
    for (int64_t oh = 0; oh < g_.OH; oh += kMaxAcc) {
      switch (std::min<int64_t>(kMaxAcc, g_.OH - oh)) {
#define PYVL_PAIR(R) \
  case R:            \
    pair_tile3<R>(x0, x1, wv, bv, out0, out1, oh); break;
        PYVL_PAIR(1) PYVL_PAIR(2) PYVL_PAIR(3) PYVL_PAIR(4) PYVL_PAIR(5) PYVL_PAIR(6) PYVL_PAIR(7) PYVL_PAIR(8)
#undef PYVL_PAIR
        default: __builtin_unreachable();
      }
    }
  }

  void operator()(const float* x, const float* w, float b, float* out) {
    if (!pad_) return correlate<kMasked>(x, w, b, out);
    copy_in(x);
    correlate<kPlain>(scratch_.data(), w, b, out);
  }

 private:
  // The plane into the scratch's interior.
  void copy_in(const float* x) {
    for (int64_t h = 0; h < src_.H; ++h)
      std::copy(x + h * src_.W, x + (h + 1) * src_.W, scratch_.data() + (h + src_.ph) * g_.W + src_.pw);
  }

  // weight_grad3 on x in g_'s geometry and grad_out rows gw apart.
  template <LoadKind K>
  void weight_grad3_of(const float* x, const float* g, int64_t gw, float* acc) const {
    V sum[9];
    for (auto& v : sum) v = Isa::zero();
    for (int64_t oh = 0; oh < g_.OH; ++oh) {
      for (int64_t c = 0; c < nchunks_; ++c) {
        const V gv = load<K>(store_mask_[c].m, g + oh * gw + c * kLanes);
#pragma GCC unroll 3
        for (int kh = 0; kh < 3; ++kh) {
          const int64_t ih = oh * S - g_.ph + kh;
          if (ih < 0 || ih >= g_.H) continue;
          const float* xr = x + ih * g_.W;
#pragma GCC unroll 3
          for (int kw = 0; kw < 3; ++kw) {
            const V v = load_tap<K>(taps_[c * 3 + kw], xr);
            sum[kh * 3 + kw] = Isa::fma(gv, v, sum[kh * 3 + kw]);
          }
        }
      }
    }
    for (int k = 0; k < 9; ++k) acc[k] += Isa::sum(sum[k]);
  }

  // out = the correlation of x (in g_'s geometry) with w, + b.
  template <LoadKind K>
  void correlate(const float* x, const float* w, float b, float* out) {
    const V bv = Isa::set1(b);
    if (k3_) {
      V wv[9];
      for (int k = 0; k < 9; ++k) wv[k] = Isa::set1(w[k]);
      for (int64_t oh = 0; oh < g_.OH;) {
        const int r = static_cast<int>(std::min<int64_t>(rows3_, g_.OH - oh));  // every r <= rows3_ has a tile
        for (int64_t c0 = 0; c0 < nchunks_; c0 += cb3_) {
          const int cb = static_cast<int>(std::min<int64_t>(cb3_, nchunks_ - c0));
          dispatch3<K>(r, cb, x, wv, bv, out, oh, c0);
        }
        oh += r;
      }
      return;
    }
    for (int64_t oh = 0; oh < g_.OH;) {
      // rows_ rows at a time, the tail in halving steps (8 -> 4 -> 2 -> 1)
      int r = rows_;
      while (r > 1 && oh + r > g_.OH) r /= 2;
      for (int64_t c0 = 0; c0 < nchunks_; c0 += cb_) {
        const int cb = static_cast<int>(std::min<int64_t>(cb_, nchunks_ - c0));
        dispatch<K>(r, cb, x, w, bv, out, oh, c0);
      }
      oh += r;
    }
  }

  // One chunk's inputs for tap t from input row xr: 16 lanes at stride 1; at stride 2 the even elements of 32,
  // through a two-source permute. Lanes off in t's masks (padding, past the row's end) are zero.
  template <LoadKind K>
  __attribute__((always_inline)) V load_tap(const ChunkTap& t, const float* xr) const {
    const V v = load<K>(t.lo, xr + t.col);
    if (S == 1) return v;
    return Isa::even(v, load<K>(t.hi, xr + t.col + kLanes));
  }

  template <int R, int CB>
  __attribute__((always_inline)) static void fill_tile(V (&acc)[R][CB], V v) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < CB; ++c) acc[r][c] = v;
  }

  // The tile's rows to out (rows oh0.., chunks c0..), each chunk's lanes past the row's end left unwritten.
  template <int R, int CB>
  __attribute__((always_inline)) void store_tile(const V (&acc)[R][CB], float* out, int64_t oh0, int64_t c0) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      float* orow = out + (oh0 + r) * g_.OW + c0 * kLanes;
#pragma GCC unroll 8
      for (int c = 0; c < CB; ++c) {
        const StoreMask& m = store_mask_[c0 + c];
        Isa::store(m.m, m.n, orow + c * kLanes, acc[r][c]);
      }
    }
  }

  template <int R, int CB, LoadKind K>
  void tile(const float* x, const float* w, V bv, float* out, int64_t oh0, int64_t c0) {
    V acc[R][CB];
    fill_tile<R, CB>(acc, bv);
    const ChunkTap* taps = taps_.data() + c0 * g_.KW;
    int64_t ih0[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) ih0[r] = (oh0 + r) * g_.sh - g_.ph;
    // One chunk's tap (kw) has one set of masks for every kernel row and every row of the tile: those loops go
    // inside it, so each mask is loaded once per KH*R FMAs. The tile's rows and chunks are fully unrolled and the
    // accumulators stay in registers; a kernel row that falls in the padding is skipped for that output row.
    for (int64_t kw = 0; kw < g_.KW; ++kw) {
#pragma GCC unroll 8
      for (int c = 0; c < CB; ++c) {
        const ChunkTap& t = taps[c * g_.KW + kw];
        for (int64_t kh = 0; kh < g_.KH; ++kh) {
          const V wv = Isa::set1(w[kh * g_.KW + kw]);
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
            const int64_t ih = ih0[r] + kh * g_.dh;
            if (ih < 0 || ih >= g_.H) continue;
            const V v = load_tap<K>(t, x + ih * g_.W);
            acc[r][c] = Isa::fma(wv, v, acc[r][c], t.fma);
          }
        }
      }
    }
    store_tile<R, CB>(acc, out, oh0, c0);
  }

  // 3x3, dilation 1, stride S along both axes: each input row of the tile is loaded once per (kw, chunk) and feeds
  // every output row it touches (up to three), with the nine weights in registers: (S*(R - 1) + 3) * 3 loads for
  // 9 * R FMAs.
  template <int R, int CB, LoadKind K>
  void tile3(const float* x, const V* wv, V bv, float* out, int64_t oh0, int64_t c0) {
    V acc[R][CB];
    fill_tile<R, CB>(acc, bv);
    const ChunkTap* taps = taps_.data() + c0 * 3;
#pragma GCC unroll 17
    for (int i = 0; i < S * (R - 1) + 3; ++i) {
      const int64_t ih = oh0 * S - g_.ph + i;
      if (ih < 0 || ih >= g_.H) continue;
      const float* xr = x + ih * g_.W;
#pragma GCC unroll 3
      for (int kw = 0; kw < 3; ++kw) {
#pragma GCC unroll 8
        for (int c = 0; c < CB; ++c) {
          const ChunkTap& t = taps[c * 3 + kw];
          const V v = load_tap<K>(t, xr);
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
            const int kh = i - S * r;
            if (kh >= 0 && kh < 3) acc[r][c] = Isa::fma(wv[kh * 3 + kw], v, acc[r][c], t.fma);
          }
        }
      }
    }
    store_tile<R, CB>(acc, out, oh0, c0);
  }

  // tile3 for pair(): R output rows of both planes, one accumulator per row.
  template <int R>
  void pair_tile3(const float* x0, const float* x1, const V* wv, V bv, float* out0, float* out1, int64_t oh0) {
    constexpr int kHalf = kLanes / 2;
    V acc[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = bv;
    M lo[3], hi[3], fma[3];
    int64_t col[3];
#pragma GCC unroll 3
    for (int kw = 0; kw < 3; ++kw) {
      lo[kw] = taps_[kw].lo;
      hi[kw] = pair_hi_[kw];
      fma[kw] = pair_fma_[kw];
      col[kw] = taps_[kw].col;
    }
#pragma GCC unroll 17
    for (int i = 0; i < S * (R - 1) + 3; ++i) {
      const int64_t ih = oh0 * S - g_.ph + i;
      if (ih < 0 || ih >= g_.H) continue;
      const float* r0 = x0 + ih * g_.W;
      const float* r1 = x1 + ih * g_.W;
#pragma GCC unroll 3
      for (int kw = 0; kw < 3; ++kw) {
        V v;
        if (S == 1)
          v = Isa::load_into(Isa::load(lo[kw], r0 + col[kw]), hi[kw], r1 + col[kw] - kHalf);
        else
          v = Isa::even(Isa::load(lo[kw], r0 + col[kw]), Isa::load(lo[kw], r1 + col[kw]));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const int kh = i - S * r;
          if (kh >= 0 && kh < 3) acc[r] = Isa::fma(wv[kh * 3 + kw], v, acc[r], fma[kw]);
        }
      }
    }
    const M m = store_mask_[0].m, m1 = pair_store_hi_;
    const int n = store_mask_[0].n;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      Isa::store(m, n, out0 + (oh0 + r) * g_.OW, acc[r]);
      Isa::store_high(m1, n, out1 + (oh0 + r) * g_.OW, acc[r]);
    }
  }

  template <LoadKind K>
  void dispatch3(int r, int cb, const float* x, const V* wv, V bv, float* out, int64_t oh, int64_t c0) {
    switch (r * 16 + cb) {
#define PYVL_TILE(R, CB) \
  case R * 16 + CB:      \
    tile3<R, CB, K>(x, wv, bv, out, oh, c0); break;
#define PYVL_TILES4(CB) PYVL_TILE(1, CB) PYVL_TILE(2, CB) PYVL_TILE(3, CB) PYVL_TILE(4, CB)
#define PYVL_TILES8(CB) PYVL_TILES4(CB) PYVL_TILE(5, CB) PYVL_TILE(6, CB) PYVL_TILE(7, CB) PYVL_TILE(8, CB)
      PYVL_TILES8(1) PYVL_TILES8(2) PYVL_TILES4(3) PYVL_TILES4(4)
      PYVL_TILE(1, 5) PYVL_TILE(2, 5) PYVL_TILE(1, 6) PYVL_TILE(2, 6)
      PYVL_TILE(1, 7) PYVL_TILE(2, 7) PYVL_TILE(1, 8) PYVL_TILE(2, 8)
#undef PYVL_TILES8
#undef PYVL_TILES4
#undef PYVL_TILE
      default: __builtin_unreachable();
    }
  }

  template <LoadKind K>
  void dispatch(int r, int cb, const float* x, const float* w, V bv, float* out, int64_t oh, int64_t c0) {
    switch (r * 16 + cb) {
#define PYVL_TILE(R, CB) \
  case R * 16 + CB:      \
    tile<R, CB, K>(x, w, bv, out, oh, c0); break;
      PYVL_TILE(8, 1) PYVL_TILE(4, 1) PYVL_TILE(2, 1) PYVL_TILE(1, 1)
      PYVL_TILE(4, 2) PYVL_TILE(2, 2) PYVL_TILE(1, 2)
      PYVL_TILE(2, 3) PYVL_TILE(1, 3)
      PYVL_TILE(2, 4) PYVL_TILE(1, 4)
      PYVL_TILE(1, 5) PYVL_TILE(1, 6) PYVL_TILE(1, 7) PYVL_TILE(1, 8)
#undef PYVL_TILE
      default: __builtin_unreachable();
    }
  }

  // Under AVX2 (pad_) the kernels run on scratch_, the plane zero-padded to g_, whose padding is 0; src_ is the
  // caller's geometry. Otherwise g_ = src_.
  PlaneGeom g_, src_;
  int64_t nchunks_;
  int cb_ = 1, rows_ = 1;
  bool k3_ = false;
  int cb3_ = 1, rows3_ = 1;
  M pair_hi_[3] = {}, pair_fma_[3] = {};  // per kw, for pair(): chunk 0's load mask moved to the high half; its
  M pair_store_hi_ = {};                   // FMA mask in both halves; its store mask in the high half
  std::vector<ChunkTap> taps_;
  struct StoreMask {
    M m;    // lanes of the chunk inside the row,
    int n;  // as a count
  };
  std::vector<StoreMask> store_mask_;
  bool pad_ = false;
  std::vector<float> scratch_, gscratch_;  // the padded plane; weight_grad3's padded grad_out (made on first use)
};

// Whether the plane kernels take a forward (or stride-1 input gradient) of this geometry: any plane under AVX-512;
// under AVX2 stride-2 planes at most kPadCopyMaxWidth wide. Measured under AVX2 (Zen 3, batch 8, 2 threads, input in
// L3, fastest of 50 calls, 3 interleaved runs) against the kernels they would replace: stride 2 at 56x56 / 28x28 /
// 14x14 1.5 / 1.6 / 1.7x; but stride 1 at 56 / 28 / 14 / 7 1.0 / 0.8 / 0.95 / 1.0x against PhasePlanes' flat rows,
// and 0.85-0.9x at 112x112 (stride 1 and 2, read from main memory), where the copy into the scratch plane costs
// more than the tiles save. The weight gradient gains at both strides (1.1-5x at MobileNetV1's shapes up to 56x56),
// and at 112x112 stride 2 (2.2x: the row dots it replaces read every other input).
inline bool takes(const PlaneGeom& g) {
  return (g.sw == 1 || g.sw == 2) && (Isa::kMaskedOnly || (g.sw == 2 && g.W <= kPadCopyMaxWidth));
}
inline bool takes_weight_grad(const PlaneGeom& g) {
  return Isa::kMaskedOnly || g.W <= kPadCopyMaxWidth || g.sw == 2;
}

}  // namespace planes
#endif

PlaneGeom plane_geom(const Conv2dShape& s) {
  return PlaneGeom{s.H, s.W, s.OH, s.OW, s.KH, s.KW, s.stride_h, s.stride_w, s.pad_h, s.pad_w, s.dil_h, s.dil_w};
}

// Every plane p = n*C + c through one thread's plane kernel (made once per thread), static split of the planes.
template <typename Kernel, typename T>
void correlate_planes(const T* x, const T* weight, const T* bias, T* out, const Conv2dShape& s, const PlaneGeom& g) {
#pragma omp parallel
  {
    Kernel correlate(g);
#pragma omp for collapse(2) schedule(static)
    for (int64_t n = 0; n < s.N; ++n) {
      for (int64_t c = 0; c < s.C; ++c) {
        const int64_t p = n * s.C + c;
        correlate(x + p * s.H * s.W, weight + c * s.KH * s.KW, bias ? bias[c] : T(0), out + p * s.OH * s.OW);
      }
    }
  }
}

#if defined(PYVL_PLANE_KERNELS)
// correlate_planes through planes::PlaneKernel<S>, two planes per call where its pair() applies: planes 2q and
// 2q + 1 of the N*C (they may belong to different images), an odd last one alone.
template <int S>
void correlate_planes_simd(const float* x, const float* weight, const float* bias, float* out, const Conv2dShape& s,
                           const PlaneGeom& g) {
  if (!planes::PlaneKernel<S>::pair_applies(g))
    return correlate_planes<planes::PlaneKernel<S>>(x, weight, bias, out, s, g);
  const int64_t planes = s.N * s.C, in = s.H * s.W, on = s.OH * s.OW, KK = s.KH * s.KW;
#pragma omp parallel
  {
    planes::PlaneKernel<S> correlate(g);
#pragma omp for schedule(static)
    for (int64_t q = 0; q < (planes + 1) / 2; ++q) {
      const int64_t p0 = 2 * q, p1 = p0 + 1, c0 = p0 % s.C, c1 = p1 % s.C;
      const float b0 = bias ? bias[c0] : 0.f;
      if (p1 == planes) {
        correlate(x + p0 * in, weight + c0 * KK, b0, out + p0 * on);
        continue;
      }
      correlate.pair(x + p0 * in, x + p1 * in, weight + c0 * KK, weight + c1 * KK, b0, bias ? bias[c1] : 0.f,
                     out + p0 * on, out + p1 * on);
    }
  }
}
#endif

template <typename T>
void forward_nchw(const T* x, const T* weight, const T* bias, T* out, const Conv2dShape& s) {
  const PlaneGeom g = plane_geom(s);
#if defined(PYVL_PLANE_KERNELS)
  if constexpr (std::is_same_v<T, float>) {
    if (planes::takes(g))
      return g.sw == 1 ? correlate_planes_simd<1>(x, weight, bias, out, s, g)
                       : correlate_planes_simd<2>(x, weight, bias, out, s, g);
  }
#endif
  correlate_planes<PlaneCorrelator<T>>(x, weight, bias, out, s, g);
}

// grad_x of small strided planes (W <= 64): the transposed convolution as a stride-1 correlation of the zero-
// upsampled grad_out (U[S*oh][S*ow] = grad_out[oh][ow]) with the flipped kernel, over flat rows of a zero-padded
// buffer so that every tap is one contiguous run (as PhasePlanes does for the forward). Of the taps' products a
// 1/(S_h*S_w) share are nonzero, but all of them vectorize; the phase loop below ran 7- and 14-wide rows one short
// axpy at a time (0.4-0.6x PyTorch at MobileNet's 28x28 and 14x14 stride-2 layers).
// f(state, p) for every plane p = n*C + c of an NCHW problem, in parallel (static split of the planes); `state` is
// the thread's scratch, made once by make_state().
template <typename MakeState, typename F>
void for_each_plane(const Conv2dShape& s, MakeState make_state, F f) {
#pragma omp parallel
  {
    auto state = make_state();
#pragma omp for schedule(static)
    for (int64_t p = 0; p < s.N * s.C; ++p) f(state, p);
  }
}

inline bool upsampled_input_grad_applies(const Conv2dShape& s) {
  return (s.stride_h > 1 || s.stride_w > 1) && s.W <= kPadCopyMaxWidth && s.pad_h >= 0 && s.pad_w >= 0 &&
         s.pad_h <= (s.KH - 1) * s.dil_h && s.pad_w <= (s.KW - 1) * s.dil_w;
}

template <typename T>
void backward_input_nchw_upsampled(const T* grad_out, const T* weight, T* grad_x, const Conv2dShape& s) {
  const int64_t KK = s.KH * s.KW;
  // grad_x[ih][iw] = sum_k w[kh][kw] U[ih + ph - kh*dh][iw + pw - kw*dw]. U[u][v] sits in the buffer at
  // (r0 + u) * Wu + c0 + v with r0 = (KH-1)*dh - ph >= 0 (likewise c0), so output (ih, iw), at flat index
  // ih*Wu + iw of the grid, reads tap k at + (KH-1-kh)*dh*Wu + (KW-1-kw)*dw; cells never written are U's zeros
  // and the padding. The grid's junk columns (iw >= W) of its last row read up to Hu*Wu - 1 + (KW-1)*dw, so the
  // buffer has that much zero slack (tier 6's ASan caught the read past the end when it had none).
  const int64_t r0 = (s.KH - 1) * s.dil_h - s.pad_h, c0 = (s.KW - 1) * s.dil_w - s.pad_w;
  const int64_t Wu = s.W + (s.KW - 1) * s.dil_w, Hu = s.H + (s.KH - 1) * s.dil_h, G = s.H * Wu;
  std::vector<int64_t> offset(KK);
  for (int64_t kh = 0; kh < s.KH; ++kh)
    for (int64_t kw = 0; kw < s.KW; ++kw)
      offset[kh * s.KW + kw] = (s.KH - 1 - kh) * s.dil_h * Wu + (s.KW - 1 - kw) * s.dil_w;
  struct Scratch {
    std::vector<T> up, grid;
  };
  auto make = [&] { return Scratch{std::vector<T>(Hu * Wu + (s.KW - 1) * s.dil_w, T(0)), std::vector<T>(G)}; };
  for_each_plane(s, make, [&](Scratch& sc, int64_t p) {
    const T* go = grad_out + p * s.OH * s.OW;
    const T* wc = weight + (p % s.C) * KK;
    // Only the (S*oh, S*ow) cells are ever written, the same ones for every plane; the rest stay zero.
    for (int64_t oh = 0; oh < s.OH; ++oh) {
      T* row = sc.up.data() + (r0 + oh * s.stride_h) * Wu + c0;
      for (int64_t ow = 0; ow < s.OW; ++ow) row[ow * s.stride_w] = go[oh * s.OW + ow];
    }
    std::fill(sc.grid.begin(), sc.grid.end(), T(0));
    for (int64_t k = 0; k < KK; ++k) {
      const T wk = wc[k];
      const T* src = sc.up.data() + offset[k];
      T* dst = sc.grid.data();
#pragma omp simd
      for (int64_t i = 0; i < G; ++i) dst[i] += wk * src[i];
    }
    T* gx = grad_x + p * s.H * s.W;
    for (int64_t ih = 0; ih < s.H; ++ih)
      std::copy(sc.grid.data() + ih * Wu, sc.grid.data() + ih * Wu + s.W, gx + ih * s.W);
  });
}

#if defined(__AVX512F__)
// grad_x of float kernels 3 wide at stride 2 along w (dilation 1; any kernel height, stride and dilation along h),
// in 16-lane chunks of a grad_x row. With u = iw + pad_w, column iw receives w[kh][0] g[u/2] + w[kh][2] g[u/2 - 1]
// where u is even and w[kh][1] g[(u-1)/2] where it is odd: one 16-wide masked load of the grad_out row (zeros
// outside [0, OW)) and two permutes give D = g[floor(u/2)] and D2 = g[floor(u/2) - 1] per lane, so a chunk costs
// per kernel row one load, two permutes and two FMAs with a per-lane weight (w0 on even u, w1 on odd) and a
// masked one (w2, even u). No phase buffer, no scatter of phases into the row. C++ harness, batch 8, 2 threads,
// 2-core Sapphire Rapids VM, medians of 4 interleaved runs against the phase loop below (W > 64) and the
// zero-upsampled correlation (W <= 64), MobileNetV1's stride-2 shapes: C 64 112x112 4.97x, C 128 56x56 2.58x,
// C 256 28x28 1.86x, C 512 14x14 2.66x.
inline bool s2k3_input_grad_applies(const Conv2dShape& s) { return s.KW == 3 && s.stride_w == 2 && s.dil_w == 1; }

void backward_input_nchw_s2k3(const float* grad_out, const float* weight, float* grad_x, const Conv2dShape& s) {
  constexpr int kL = planes::kLanes;
  const TapTable rows = transposed_taps(s.H, s.OH, s.KH, s.stride_h, s.pad_h, s.dil_h);
  const int par = static_cast<int>(s.pad_w & 1);  // parity of u at lane 0 of every chunk (chunks start even)
  alignas(64) int32_t di[kL], d2i[kL];
  __mmask16 even = 0;
  for (int l = 0; l < kL; ++l) {
    const int q = (l + par) / 2;  // window = grad_out[b, b + 16), b the chunk's start below
    di[l] = q + 1;
    d2i[l] = q;
    if ((l + par) % 2 == 0) even |= __mmask16(1u << l);
  }
  const __m512i d_idx = _mm512_load_si512(di), d2_idx = _mm512_load_si512(d2i);
  // Per chunk: the window's start b = floor((iw0 + pad_w) / 2) - 1 and its load mask (elements in [0, OW)).
  const int64_t nchunks = (s.W + kL - 1) / kL;
  std::vector<int64_t> start(nchunks);
  std::vector<__mmask16> in_row(nchunks);
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t b = floor_div(c * kL + s.pad_w, 2) - 1;
    const int64_t lo = std::max<int64_t>(0, -b), hi = std::clamp<int64_t>(s.OW - b, 0, kL);
    start[c] = b;
    in_row[c] = lo < hi ? __mmask16(((1u << hi) - 1) & ~((1u << lo) - 1)) : __mmask16(0);
  }
  const int64_t KH = s.KH, planes = s.N * s.C;
#pragma omp parallel
  {
    std::vector<float> wa(KH * kL), wc(KH * kL);  // per kernel row, 16 lanes: w0 on even u, w1 on odd; w2
#pragma omp for schedule(static)
    for (int64_t p = 0; p < planes; ++p) {
      const float* w = weight + (p % s.C) * KH * 3;
      for (int64_t kh = 0; kh < KH; ++kh) {
        _mm512_storeu_ps(wa.data() + kh * kL,
                         _mm512_mask_blend_ps(even, _mm512_set1_ps(w[kh * 3 + 1]), _mm512_set1_ps(w[kh * 3])));
        _mm512_storeu_ps(wc.data() + kh * kL, _mm512_set1_ps(w[kh * 3 + 2]));
      }
      const float* go = grad_out + p * s.OH * s.OW;
      float* gx = grad_x + p * s.H * s.W;
      for (int64_t ih = 0; ih < s.H; ++ih) {
        const int64_t nr = rows.count[ih];
        const int64_t* rk = rows.k.data() + ih * rows.K;
        const int64_t* rp = rows.pos.data() + ih * rows.K;
        for (int64_t c = 0; c < nchunks; ++c) {
          const int64_t iw0 = c * kL;
          __m512 acc = _mm512_setzero_ps();
          for (int64_t a = 0; a < nr; ++a) {
            const __m512 win = _mm512_maskz_loadu_ps(in_row[c], go + rp[a] * s.OW + start[c]);
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(wa.data() + rk[a] * kL), _mm512_permutexvar_ps(d_idx, win), acc);
            acc = _mm512_mask3_fmadd_ps(_mm512_loadu_ps(wc.data() + rk[a] * kL), _mm512_permutexvar_ps(d2_idx, win),
                                        acc, even);
          }
          const int64_t n = std::min<int64_t>(kL, s.W - iw0);
          _mm512_mask_storeu_ps(gx + ih * s.W + iw0, __mmask16((1u << n) - 1), acc);
        }
      }
    }
  }
}
#endif

template <typename T>
void backward_input_nchw(const T* grad_out, const T* weight, T* grad_x, const Conv2dShape& s) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (s2k3_input_grad_applies(s)) return backward_input_nchw_s2k3(grad_out, weight, grad_x, s);
  }
#endif
  if (upsampled_input_grad_applies(s)) {
    backward_input_nchw_upsampled(grad_out, weight, grad_x, s);
    return;
  }
  const int64_t KK = s.KH * s.KW;
  if (s.stride_h == 1 && s.stride_w == 1) {
    // At stride 1 the transposed convolution is a correlation of grad_out with the flipped kernel, so it reuses
    // the forward row kernels (the padding dil*(K-1) - pad may come out negative; correlate_plane allows it).
    std::vector<T> flipped(s.C * KK);
    for (int64_t c = 0; c < s.C; ++c)
      for (int64_t k = 0; k < KK; ++k) flipped[c * KK + k] = weight[c * KK + KK - 1 - k];
    const PlaneGeom g{s.OH, s.OW, s.H, s.W, s.KH, s.KW, 1, 1,
                      s.dil_h * (s.KH - 1) - s.pad_h, s.dil_w * (s.KW - 1) - s.pad_w, s.dil_h, s.dil_w};
#if defined(PYVL_PLANE_KERNELS)
    if constexpr (std::is_same_v<T, float>) {
      if (g.ph >= 0 && g.pw >= 0) {
        // The forward's plane kernels (3x3 register tiles, two planes per vector for rows of at most half a
        // vector), on grad_out as the input. C++ harness, batch 8, 2 threads, 2-core Sapphire Rapids VM, medians of 6
        // interleaved runs against the per-plane correlator below, MobileNetV1's stride-1 shapes: C 32 112x112
        // 1.58x, C 128 56x56 1.86x, C 256 28x28 1.78x, C 512 14x14 1.64x, C 1024 7x7 2.77x.
        const Conv2dShape t{s.N, s.C, s.OH, s.OW, s.KH, s.KW, s.H, s.W, 1, 1, g.ph, g.pw, s.dil_h, s.dil_w};
        forward_nchw(grad_out, flipped.data(), static_cast<const T*>(nullptr), grad_x, t);
        return;
      }
    }
#endif
#pragma omp parallel
    {
      PlaneCorrelator<T> correlate(g);
#pragma omp for collapse(2) schedule(static)
      for (int64_t n = 0; n < s.N; ++n) {
        for (int64_t c = 0; c < s.C; ++c) {
          const int64_t p = n * s.C + c;
          correlate(grad_out + p * s.OH * s.OW, flipped.data() + c * KK, T(0), grad_x + p * s.H * s.W);
        }
      }
    }
    return;
  }
  // Strided: split each grad_x row into its stride_w phases. Within one phase the columns receiving a given tap
  // read consecutive grad_out columns, so the sums vectorize; the phase is then interleaved into the row once.
  const TapTable rows = transposed_taps(s.H, s.OH, s.KH, s.stride_h, s.pad_h, s.dil_h);
  const int64_t sw = s.stride_w;
  const int64_t J_max = (s.W + sw - 1) / sw;
  for_each_plane(s, [&] { return std::vector<T>(J_max); }, [&](std::vector<T>& phase, int64_t p) {
    const T* go = grad_out + p * s.OH * s.OW;
    const T* wc = weight + (p % s.C) * KK;
    T* gx = grad_x + p * s.H * s.W;
    for (int64_t ih = 0; ih < s.H; ++ih) {
      T* gx_row = gx + ih * s.W;
      const int64_t nh = rows.count[ih];
      for (int64_t r = 0; r < std::min(sw, s.W); ++r) {
        const int64_t J = (s.W - 1 - r) / sw + 1;
        std::fill(phase.begin(), phase.begin() + J, T(0));
        for (int64_t a = 0; a < nh; ++a) {
          const int64_t kh = rows.k[ih * s.KH + a];
          const T* go_row = go + rows.pos[ih * s.KH + a] * s.OW;
          for (int64_t kw = 0; kw < s.KW; ++kw) {
            const int64_t q = r + s.pad_w - kw * s.dil_w;
            if (((q % sw) + sw) % sw != 0) continue;
            const int64_t ow0 = floor_div(q, sw);
            const int64_t j_lo = std::max<int64_t>(0, -ow0), j_hi = std::min(J, s.OW - ow0);
            if (j_hi > j_lo)
              axpy_strided<T, 1>(phase.data() + j_lo, go_row + ow0 + j_lo, wc[kh * s.KW + kw], j_hi - j_lo, 1);
          }
        }
        for (int64_t j = 0; j < J; ++j) gx_row[r + j * sw] = phase[j];
      }
    }
  });
}

// sum_j a[j] * b[j*SW]
template <typename T, int SW>
inline T dot_strided(const T* __restrict a, const T* __restrict b, int64_t n, int64_t sw) {
  const int64_t st = SW > 0 ? SW : sw;
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j * st];
  return acc;
}

// The nine 3x3 stride-1 tap sums of one row pair in a single pass, so grad_out is read once instead of nine times.
template <typename T>
inline void dot3x3_row(const T* __restrict g, const T* __restrict r0, const T* __restrict r1,
                       const T* __restrict r2, int64_t n, T* acc) {
  T a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0, a8 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7, a8)
  for (int64_t j = 0; j < n; ++j) {
    const T gj = g[j];
    a0 += gj * r0[j];
    a1 += gj * r0[j + 1];
    a2 += gj * r0[j + 2];
    a3 += gj * r1[j];
    a4 += gj * r1[j + 1];
    a5 += gj * r1[j + 2];
    a6 += gj * r2[j];
    a7 += gj * r2[j + 1];
    a8 += gj * r2[j + 2];
  }
  acc[0] += a0; acc[1] += a1; acc[2] += a2; acc[3] += a3; acc[4] += a4;
  acc[5] += a5; acc[6] += a6; acc[7] += a7; acc[8] += a8;
}

// grad_weight of small stride-1 planes (MobileNet's 7x7 to 56x56): the plane is copied into a zero-padded scratch
// [Hp][Wp] and grad_out into a grid [OH][Wp] whose columns past OW are zero, so that tap (kh, kw) is one dot product
// of OH*Wp contiguous elements: grid . padded[kh*dh*Wp + kw*dw + ...]. The row-by-row loop below spent most of its
// time on 7- to 14-wide rows' borders and tails (2.1 ms for 8 x 1024 planes of 7x7).
// grad_weight[c] = sum over images n of plane(state, x plane (n, c), grad_out plane (n, c), acc): whole channels per
// thread, so each grad_weight[c] is a sum one thread owns, in image order (no reduction across threads). `state`
// is the thread's scratch, made once by make_state().
template <typename T, typename MakeState, typename Plane>
void weight_grad_by_channel(const T* grad_out, const T* x, T* grad_weight, const Conv2dShape& s, MakeState make_state,
                            Plane plane) {
  const int64_t KK = s.KH * s.KW;
#pragma omp parallel
  {
    auto state = make_state();
    std::vector<T> acc(KK);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < s.C; ++c) {
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t n = 0; n < s.N; ++n) {
        const int64_t p = n * s.C + c;
        plane(state, x + p * s.H * s.W, grad_out + p * s.OH * s.OW, acc.data());
      }
      std::copy(acc.begin(), acc.end(), grad_weight + c * KK);
    }
  }
}

inline bool flat_weight_grad_applies(const Conv2dShape& s) {
  return s.stride_h == 1 && s.stride_w == 1 && s.W <= kPadCopyMaxWidth && s.pad_h >= 0 && s.pad_w >= 0;
}

template <typename T>
void backward_weight_nchw_flat(const T* grad_out, const T* x, T* grad_weight, const Conv2dShape& s) {
  const int64_t KK = s.KH * s.KW, Hp = s.H + 2 * s.pad_h, Wp = s.W + 2 * s.pad_w, G = s.OH * Wp;
  std::vector<int64_t> offset(KK);
  for (int64_t kh = 0; kh < s.KH; ++kh)
    for (int64_t kw = 0; kw < s.KW; ++kw) offset[kh * s.KW + kw] = kh * s.dil_h * Wp + kw * s.dil_w;
  struct Scratch {
    std::vector<T> padded, grid;
  };
  // Reads reach Hp*Wp + (KW-1)*dil_w - 1 (OH = Hp - (KH-1)*dil_h at stride 1): zero slack past the plane.
  auto make = [&] { return Scratch{std::vector<T>(Hp * Wp + (s.KW - 1) * s.dil_w, T(0)), std::vector<T>(G, T(0))}; };
  weight_grad_by_channel(grad_out, x, grad_weight, s, make, [&](Scratch& sc, const T* xp, const T* gp, T* acc) {
    for (int64_t h = 0; h < s.H; ++h)
      std::copy(xp + h * s.W, xp + (h + 1) * s.W, sc.padded.data() + (h + s.pad_h) * Wp + s.pad_w);
    for (int64_t oh = 0; oh < s.OH; ++oh) std::copy(gp + oh * s.OW, gp + (oh + 1) * s.OW, sc.grid.data() + oh * Wp);
    for (int64_t k = 0; k < KK; ++k) {
      const T* xs = sc.padded.data() + offset[k];
      const T* g = sc.grid.data();
      T sum = T(0);
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < G; ++i) sum += g[i] * xs[i];
      acc[k] += sum;
    }
  });
}

template <typename T>
void backward_weight_nchw(const T* grad_out, const T* x, T* grad_weight, const Conv2dShape& s) {
#if defined(PYVL_PLANE_KERNELS)
  if constexpr (std::is_same_v<T, float>) {
    const PlaneGeom g = plane_geom(s);
    auto run = [&](auto kernel) {
      using K = decltype(kernel);
      weight_grad_by_channel(grad_out, x, grad_weight, s, [&] { return K(g); },
                             [](K& k, const T* xp, const T* gp, T* acc) { k.weight_grad3(xp, gp, acc); });
    };
    if (planes::takes_weight_grad(g)) {
      if (g.sw == 1 && planes::PlaneKernel<1>::is_3x3(g)) return run(planes::PlaneKernel<1>(g));
      if (g.sw == 2 && planes::PlaneKernel<2>::is_3x3(g)) return run(planes::PlaneKernel<2>(g));
    }
  }
#endif
  if (flat_weight_grad_applies(s)) {
    backward_weight_nchw_flat(grad_out, x, grad_weight, s);
    return;
  }
  std::vector<int64_t> lo(s.KW), hi(s.KW);
  for (int64_t kw = 0; kw < s.KW; ++kw) valid_outputs(kw, s.W, s.OW, s.stride_w, s.pad_w, s.dil_w, lo[kw], hi[kw]);
  // Columns where all kw are in bounds, for the fused 3x3 pass; the rest are added per tap.
  const int64_t in_lo = *std::max_element(lo.begin(), lo.end());
  const int64_t in_hi = std::max(in_lo, *std::min_element(hi.begin(), hi.end()));
  const bool fused3x3 = s.KH == 3 && s.KW == 3 && s.dil_w == 1 && s.stride_w == 1;
  auto make = [] { return 0; };
  weight_grad_by_channel(grad_out, x, grad_weight, s, make, [&](int, const T* xp, const T* gp, T* acc) {
    for (int64_t oh = 0; oh < s.OH; ++oh) {
      const T* gr = gp + oh * s.OW;
      const int64_t ih0 = oh * s.stride_h - s.pad_h;
      const bool rows_inside = ih0 >= 0 && ih0 + (s.KH - 1) * s.dil_h < s.H;
      if (fused3x3 && rows_inside && in_hi > in_lo) {
        const int64_t col0 = in_lo - s.pad_w;
        const T* r0 = xp + ih0 * s.W + col0;
        const T* r1 = r0 + s.dil_h * s.W;
        const T* r2 = r1 + s.dil_h * s.W;
        dot3x3_row(gr + in_lo, r0, r1, r2, in_hi - in_lo, acc);
        for (int64_t kh = 0; kh < 3; ++kh) {
          const T* xr = xp + (ih0 + kh * s.dil_h) * s.W;
          for (int64_t kw = 0; kw < 3; ++kw) {
            T sum = 0;
            for (int64_t ow = lo[kw]; ow < in_lo; ++ow) sum += gr[ow] * xr[ow - s.pad_w + kw];
            for (int64_t ow = in_hi; ow < hi[kw]; ++ow) sum += gr[ow] * xr[ow - s.pad_w + kw];
            acc[kh * 3 + kw] += sum;
          }
        }
        continue;
      }
      for (int64_t kh = 0; kh < s.KH; ++kh) {
        const int64_t ih = ih0 + kh * s.dil_h;
        if (ih < 0 || ih >= s.H) continue;
        const T* xr = xp + ih * s.W;
        for (int64_t kw = 0; kw < s.KW; ++kw) {
          const int64_t n_ow = hi[kw] - lo[kw];
          if (n_ow <= 0) continue;
          const T* xs = xr + lo[kw] * s.stride_w - s.pad_w + kw * s.dil_w;
          T sum;
          if (s.stride_w == 1) sum = dot_strided<T, 1>(gr + lo[kw], xs, n_ow, 1);
          else if (s.stride_w == 2) sum = dot_strided<T, 2>(gr + lo[kw], xs, n_ow, 2);
          else sum = dot_strided<T, 0>(gr + lo[kw], xs, n_ow, s.stride_w);
          acc[kh * s.KW + kw] += sum;
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// NHWC

// Channels per register-resident accumulator block: 32 floats or 16 doubles, four AVX2 registers.
template <typename T>
constexpr int64_t kChannelBlock = 128 / sizeof(T);

// dst[c] = init[c] + sum over taps of wt[tap][c] * src_pixel(tap)[c], for c in [c0, c0 + len).
template <typename T, int64_t CB>
inline void gather_block(T* __restrict dst, const T* __restrict src, const T* __restrict wt, const T* init,
                         int64_t C, int64_t KW, int64_t src_W, const int64_t* rk, const int64_t* rpos, int64_t nr,
                         const int64_t* ck, const int64_t* cpos, int64_t nc, int64_t c0, int64_t len) {
  T acc[CB > 0 ? CB : 8];  // CB = 0 is the runtime-length tail, always shorter than 8
  const int64_t L = CB > 0 ? CB : len;
  for (int64_t j = 0; j < L; ++j) acc[j] = init ? init[c0 + j] : T(0);
  for (int64_t a = 0; a < nr; ++a) {
    const T* srow = src + rpos[a] * src_W * C + c0;
    const T* wrow = wt + rk[a] * KW * C + c0;
    for (int64_t b = 0; b < nc; ++b) {
      const T* sp = srow + cpos[b] * C;
      const T* wp = wrow + ck[b] * C;
#pragma omp simd
      for (int64_t j = 0; j < L; ++j) acc[j] += wp[j] * sp[j];
    }
  }
  for (int64_t j = 0; j < L; ++j) dst[c0 + j] = acc[j];
}

// P consecutive interior pixels at once (every tap in bounds, source columns `pstep` elements apart): each tap's
// weights are loaded once for P pixels, which cuts the loads per FMA compared to one pixel at a time.
template <typename T, int64_t CB, int P>
inline void gather_block_pixels(T* __restrict dst, const T* __restrict src, const T* __restrict wt, const T* init,
                                int64_t C, int64_t KW, int64_t src_W, const int64_t* rk, const int64_t* rpos,
                                int64_t nr, const int64_t* ck, const int64_t* cpos, int64_t nc, int64_t c0,
                                int64_t pstep) {
  T acc[P][CB];
  for (int p = 0; p < P; ++p)
    for (int64_t j = 0; j < CB; ++j) acc[p][j] = init ? init[c0 + j] : T(0);
  for (int64_t a = 0; a < nr; ++a) {
    const T* srow = src + rpos[a] * src_W * C + c0;
    const T* wrow = wt + rk[a] * KW * C + c0;
    for (int64_t b = 0; b < nc; ++b) {
      const T* sp = srow + cpos[b] * C;
      const T* wp = wrow + ck[b] * C;
      for (int p = 0; p < P; ++p) {
#pragma omp simd
        for (int64_t j = 0; j < CB; ++j) acc[p][j] += wp[j] * sp[p * pstep + j];
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int64_t j = 0; j < CB; ++j) dst[p * C + c0 + j] = acc[p][j];
}

// dst [N, dst_H, dst_W, C] from src [N, src_H, src_W, C] through the tap tables: forward when the tables are
// forward_taps, backward_input when they are transposed_taps. Parallel over (n, dst row).
template <typename T>
void gather_nhwc(const T* src, int64_t src_H, int64_t src_W, const T* wt, const T* init, T* dst, int64_t dst_H,
                 int64_t dst_W, int64_t N, int64_t C, int64_t KW, const TapTable& rows, const TapTable& cols,
                 int64_t col_step) {
  constexpr int64_t CB = kChannelBlock<T>;
  // Pixel-blocked path: 2 pixels x 4 registers of channels; measured faster than 4 x 2 (fewer row streams).
  constexpr int64_t PCB = 128 / sizeof(T);
  constexpr int P = 2;
  const int64_t C_full = C / CB * CB;
  const int64_t C_pfull = C / PCB * PCB;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t oh = 0; oh < dst_H; ++oh) {
      const T* sn = src + n * src_H * src_W * C;
      const int64_t* rk = rows.k.data() + oh * rows.K;
      const int64_t* rp = rows.pos.data() + oh * rows.K;
      const int64_t nr = rows.count[oh];
      T* drow = dst + (n * dst_H + oh) * dst_W * C;
      int64_t ow = 0;
      // (col_step = 0 disables the pixel-blocked path: taps of neighbouring pixels are not a plain shift.)
      auto all_taps = [&](int64_t o) { return cols.count[o] == KW; };
      for (; ow < dst_W; ++ow) {
        if (col_step > 0 && C_pfull > 0 && ow + P <= dst_W && all_taps(ow) && all_taps(ow + P - 1)) {
          const int64_t* ck = cols.k.data() + ow * cols.K;
          const int64_t* cp = cols.pos.data() + ow * cols.K;
          T* d = drow + ow * C;
          for (int64_t c0 = 0; c0 < C_pfull; c0 += PCB)
            gather_block_pixels<T, PCB, P>(d, sn, wt, init, C, KW, src_W, rk, rp, nr, ck, cp, KW, c0, col_step * C);
          for (int p = 0; p < P && C_pfull < C; ++p) {
            T* dp = d + p * C;
            const int64_t* cpp = cols.pos.data() + (ow + p) * cols.K;
            int64_t c0 = C_pfull;
            for (; c0 + 8 <= C; c0 += 8)
              gather_block<T, 8>(dp, sn, wt, init, C, KW, src_W, rk, rp, nr, ck, cpp, KW, c0, 8);
            if (c0 < C) gather_block<T, 0>(dp, sn, wt, init, C, KW, src_W, rk, rp, nr, ck, cpp, KW, c0, C - c0);
          }
          ow += P - 1;
          continue;
        }
        const int64_t* ck = cols.k.data() + ow * cols.K;
        const int64_t* cp = cols.pos.data() + ow * cols.K;
        const int64_t nc = cols.count[ow];
        T* d = drow + ow * C;
        for (int64_t c0 = 0; c0 < C_full; c0 += CB)
          gather_block<T, CB>(d, sn, wt, init, C, KW, src_W, rk, rp, nr, ck, cp, nc, c0, CB);
        if (C_full < C) {
          // Tail channels: a smaller fixed block where it fits, so the tail still vectorizes.
          int64_t c0 = C_full;
          for (; c0 + 8 <= C; c0 += 8)
            gather_block<T, 8>(d, sn, wt, init, C, KW, src_W, rk, rp, nr, ck, cp, nc, c0, 8);
          if (c0 < C) gather_block<T, 0>(d, sn, wt, init, C, KW, src_W, rk, rp, nr, ck, cp, nc, c0, C - c0);
        }
      }
    }
  }
}

// Register-blocked forward for kernels three taps wide (dilation 1 along w, stride 1 or 2 along w).
//
// A strip of P output pixels x NV vectors of channels is held in P*NV accumulators; per kernel row the strip's
// S*(P-1)+3 input pixels are each loaded once into a register and feed every output they touch, with that row's
// three weight vectors in registers. Rows come from the tap table (any KH, stride_h, dilation_h); columns are checked
// only in strips that reach over the padding (CHECK), so interior strips carry no bounds tests. V = T runs the
// channel tail one lane at a time through the same code.
//
// Channels go in blocks of two vectors (one 64-byte line of floats), innermost, so the input rows and the output
// row are swept in address order; the weights are packed per block ([block][tap][lane]) so that sweep reads them in
// order too. Reading taps-major weights ([tap][C]: nine streams 1-4 KiB apart at C = 256..1024, all in a few L1 sets)
// and one vector per block (each line visited twice) measured several times slower at those widths.
constexpr int kStripMaxRows = 16;  // kernel rows held in the per-row pointer arrays
// 4 pixels x 2 vectors = 8 accumulators + 6 weights + 1 input: 15 AVX2 registers. With 32 registers (AVX-512),
// 8 pixels (23 registers) run where a pixel is at least kWideStripBytes: a strip's 3 x 6 input pixels then no longer
// fit in L1, and 8-pixel strips reload each block's weights and overlapping pixels half as often. C++ harness, batch
// 8, 2 threads, medians of 6 interleaved runs, 8 against 4 pixels: on a Zen 4 C 512 14x14 1.09 / 1.33x, C 1024 7x7
// 1.10 / 1.28x, but C 32..128 at 56x56 and up 0.6-0.95x (and 0.6-1.3x on a Sapphire Rapids over all the layers).
constexpr int kStripPixels = 4;
constexpr int kWideStripPixels = 8;
constexpr int64_t kWideStripBytes = 2048;

// The strips' vector: simd::wide_t, 16 floats under AVX-512 (32 registers, so 4 pixels x 2 vectors fit as on
// AVX2), else the 32-byte vector.
template <typename T>
using strip_vec_t = simd::wide_t<T>;

template <typename T>
constexpr int64_t kChannelPack = 2 * simd::lanes<T, strip_vec_t<T>>;  // 16 or 32 floats, 8 doubles

// [C, KH*KW] -> [ceil(C / B)][KH*KW][B], zero-padded, B = kChannelPack.
template <typename T>
std::vector<T> pack_channel_blocks(const T* weight, int64_t C, int64_t KK) {
  constexpr int64_t B = kChannelPack<T>;
  std::vector<T> packed((C + B - 1) / B * KK * B, T(0));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < KK; ++k) packed[(c / B * KK + k) * B + c % B] = weight[c * KK + k];
  return packed;
}

// Which input pixels of a row feed which strip pixels. A strip of P pixels starting at output column o reads the
// input pixels first(o) + j, j < inputs(P), and input j feeds strip pixel p through tap kw(j, p) where that is in
// [0, 3).
// The forward at stride S: output o reads input o*S - pad + kw.
template <int S>
struct ForwardCols {
  static constexpr int inputs(int P) { return S * (P - 1) + 3; }
  static constexpr int kw(int j, int p) { return j - S * p; }
  static int64_t first(int64_t o, int64_t pad) { return o * S - pad; }
};
// The input gradient at stride 2: grad_x column i receives grad_out column q through tap kw = i + pad - 2q, so a
// strip of grad_x pixels reads about half as many grad_out pixels, each feeding up to three strip pixels (a column
// with i + pad even receives through taps 0 and 2, an odd one through tap 1). With first(i) = floor((i + pad - 1) / 2),
// kw(j, p) = p + D - 2j where D = 2 - (i + pad) % 2: strips start at even multiples of P, so D = 2 - pad % 2 holds
// for a whole call. Against the tap-table gather that ran this case one pixel at a time (0.57-0.79x PyTorch's
// channels-last forward + backward at MobileNetV1's C 64 112x112 stride-2 layer): C++ harness, batch 8, 2 threads,
// 2-core AMD EPYC Zen 3 VM (AVX2), medians of 6 interleaved runs, MobileNetV1's stride-2 layers: C 64 112x112 1.65x,
// C 128 56x56 1.31x, C 256 28x28 2.23x, C 512 14x14 2.08x.
template <int D>
struct TransposedCols2 {
  static_assert(D == 1 || D == 2, "D = 2 - pad % 2");
  static constexpr int inputs(int P) { return (P + D - 1) / 2 + 1; }
  static constexpr int kw(int j, int p) { return p + D - 2 * j; }
  static int64_t first(int64_t o, int64_t pad) { return floor_div(o + pad - 1, 2); }
};

// out pixels [P] x channels [c, c + NV*lanes): xrows[a] is kernel row a's input row (pixel 0, channel 0) and
// wrows[a] + woff its three packed weight taps (B apart); iw0 is the strip's first input pixel (Cols::first).
template <typename T, typename V, int NV, class Cols, int P, bool CHECK>
inline void strip3(T* __restrict out, const T* const* xrows, const T* const* wrows, int64_t woff, int nr,
                   const T* bias, int64_t c, int64_t C, int64_t iw0, int64_t W) {
  constexpr int NI = Cols::inputs(P);
  constexpr int L = simd::lanes<T, V>;
  constexpr int64_t B = kChannelPack<T>;
  V acc[P][NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const V b = bias ? simd::load<V>(bias + c + v * L) : V{};
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) acc[p][v] = b;
  }
  for (int a = 0; a < nr; ++a) {
    const T* xp = xrows[a] + c + iw0 * C;  // walks the strip's input pixels, C apart
    const T* wr = wrows[a] + woff;
    V w[3][NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
#pragma GCC unroll 3
      for (int k = 0; k < 3; ++k) {
        w[k][v] = simd::load<V>(wr + k * B + v * L);
        simd::pin(w[k][v]);
      }
    }
#pragma GCC unroll 32
    for (int j = 0; j < NI; ++j) {
      const T* xj = xp;
      xp += C;
      if (CHECK && (iw0 + j < 0 || iw0 + j >= W)) continue;
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        V xv = simd::load<V>(xj + v * L);
        simd::pin(xv);
#pragma GCC unroll 16
        for (int p = 0; p < P; ++p) {
          const int kw = Cols::kw(j, p);
          if (kw >= 0 && kw < 3) acc[p][v] = simd::fmadd(w[kw][v], xv, acc[p][v]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) simd::store(out + p * C + c + v * L, acc[p][v]);
}

// One strip of P pixels over the channel block [c0, c0 + len), len <= kChannelPack: two of the widest vectors when
// the block is full, else one, then one 32-byte vector (under AVX-512), then single lanes.
template <typename T, class Cols, bool CHECK, int P>
inline void strip3_block(T* out, const T* const* xrows, const T* const* wrows, int nr, const T* bias, int64_t c0,
                         int64_t len, int64_t C, int64_t iw0, int64_t W) {
  using V = strip_vec_t<T>;
  using V2 = simd::vec_t<T>;
  constexpr int64_t L = simd::lanes<T, V>, L2 = simd::lanes<T, V2>;
  if (len == 2 * L) {
    strip3<T, V, 2, Cols, P, CHECK>(out, xrows, wrows, 0, nr, bias, c0, C, iw0, W);
    return;
  }
  int64_t i = 0;
  if (len >= L) {
    strip3<T, V, 1, Cols, P, CHECK>(out, xrows, wrows, 0, nr, bias, c0, C, iw0, W);
    i = L;
  }
  if constexpr (L2 < L) {
    if (len - i >= L2) {
      strip3<T, V2, 1, Cols, P, CHECK>(out, xrows, wrows, i, nr, bias, c0 + i, C, iw0, W);
      i += L2;
    }
  }
  for (; i < len; ++i) strip3<T, T, 1, Cols, P, CHECK>(out, xrows, wrows, i, nr, bias, c0 + i, C, iw0, W);
}

template <typename T, class Cols, bool CHECK, int PMAX>
void strip3_any(int n, T* out, const T* const* xrows, const T* const* wrows, int nr, const T* bias, int64_t c0,
                int64_t len, int64_t C, int64_t iw0, int64_t W) {
  static_assert(PMAX == 4 || PMAX == 8, "one case per strip length");
  if constexpr (PMAX == 8) {
    switch (n) {
      case 8: return strip3_block<T, Cols, CHECK, 8>(out, xrows, wrows, nr, bias, c0, len, C, iw0, W);
      case 7: return strip3_block<T, Cols, CHECK, 7>(out, xrows, wrows, nr, bias, c0, len, C, iw0, W);
      case 6: return strip3_block<T, Cols, CHECK, 6>(out, xrows, wrows, nr, bias, c0, len, C, iw0, W);
      case 5: return strip3_block<T, Cols, CHECK, 5>(out, xrows, wrows, nr, bias, c0, len, C, iw0, W);
      default: break;
    }
  }
  switch (n) {
    case 4: strip3_block<T, Cols, CHECK, 4>(out, xrows, wrows, nr, bias, c0, len, C, iw0, W); break;
    case 3: strip3_block<T, Cols, CHECK, 3>(out, xrows, wrows, nr, bias, c0, len, C, iw0, W); break;
    case 2: strip3_block<T, Cols, CHECK, 2>(out, xrows, wrows, nr, bias, c0, len, C, iw0, W); break;
    default: strip3_block<T, Cols, CHECK, 1>(out, xrows, wrows, nr, bias, c0, len, C, iw0, W); break;
  }
}

bool strip3_applies(const Conv2dShape& s) {
  return s.KW == 3 && s.dil_w == 1 && (s.stride_w == 1 || s.stride_w == 2) && s.KH <= kStripMaxRows;
}

// Inputs above this many bytes per thread get forward_nhwc_strips' row-ahead prefetch.
constexpr int64_t kPrefetchBytes = int64_t(4) << 20;

// out [N, OH, OW, C] = correlation of x [N, H, W, C] with the packed weights [block][KH*3][B] + bias, in strips of
// up to P pixels, the rows through `rows` and the columns through Cols (ForwardCols<S>; or TransposedCols2, which
// makes it the stride-2 input gradient: x is then grad_out and out grad_x, with `rows` from transposed_taps).
template <typename T, class Cols, int P>
void forward_nhwc_strips_of(const T* x, const T* wpk, const T* bias, T* out, int64_t N, int64_t H, int64_t W,
                            int64_t C, int64_t OH, int64_t OW, int64_t KH, int64_t pad_w, const TapTable& rows) {
  constexpr int64_t B = kChannelPack<T>;
  const int64_t KK = KH * 3;
  // Software prefetch, one output row ahead: while a strip runs, the lines of the input rows that the next output
  // row reads and this one does not (one row at stride 1, two at stride 2), over this strip's columns and channel
  // block. The strip itself reads its pixels channel block by channel block, S*(P-1)+3 pixels C apart: strided
  // streams the hardware prefetchers follow poorly from main memory. Measured on a 2-core AMD EPYC (Zen 4), batch 8,
  // 2 threads, against no prefetch: C 64 112x112 s2 1.35x, C 128 56x56 s1 1.5x / s2 1.1x, C 32 112x112 unchanged,
  // and 0.75-0.9x at C >= 256 (28x28 and smaller), whose input a thread's caches hold, so it is on only for inputs
  // larger than kPrefetchBytes per thread. (The previous scheme, the next strip's pixels of all kernel rows, gained
  // 1.2-2x on a Zen 3 at C = 64..256 but measured 0.85-1.0x here.) On a 2-core Sapphire Rapids VM the same
  // prefetch measured 0.87-0.95x at C 64 112x112 s2 and C 128 56x56 s2 (medians of 4 interleaved runs, the other
  // shapes unchanged): Intel's L2 streamer follows these streams, so the prefetch is on for AMD processors only.
  const int64_t in_bytes = N * H * W * C * static_cast<int64_t>(sizeof(T));
  static const bool amd = __builtin_cpu_is("amd");
  const bool prefetch = amd && in_bytes > kPrefetchBytes * omp_get_max_threads();
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t oh = 0; oh < OH; ++oh) {
      const T* xrows[kStripMaxRows];
      const int nr = static_cast<int>(rows.count[oh]);
      for (int a = 0; a < nr; ++a) xrows[a] = x + (n * H + rows.pos[oh * rows.K + a]) * W * C;
      const T* ahead[kStripMaxRows];  // the rows the next output row adds
      int na = 0;
      if (prefetch && oh + 1 < OH) {
        int64_t last = -1;  // the last input row this output row reads (transposed tables list rows downwards)
        for (int a = 0; a < nr; ++a) last = std::max(last, rows.pos[oh * rows.K + a]);
        for (int64_t a = 0; a < rows.count[oh + 1]; ++a) {
          const int64_t r = rows.pos[(oh + 1) * rows.K + a];
          if (r > last) ahead[na++] = x + (n * H + r) * W * C;
        }
      }
      T* orow = out + (n * OH + oh) * OW * C;
      auto run = [&](int64_t c0, int64_t ow) {
        const int64_t len = std::min(B, C - c0);
        const T* wrows[kStripMaxRows];
        for (int a = 0; a < nr; ++a) wrows[a] = wpk + (c0 / B * KK + rows.k[oh * rows.K + a] * 3) * B;
        const int pn = static_cast<int>(std::min<int64_t>(P, OW - ow));
        const int64_t iw0 = Cols::first(ow, pad_w);
        T* o = orow + ow * C;
        if (na) {
          // The strips of a row partition its input columns: [iw0 + 2, next strip's iw0 + 2), the first from 0 and
          // the last to W.
          const int64_t q_lo = ow == 0 ? 0 : std::max<int64_t>(iw0 + 2, 0);
          const int64_t q_hi = ow + P >= OW ? W : std::min<int64_t>(Cols::first(ow + P, pad_w) + 2, W);
          for (int a = 0; a < na; ++a)
            for (int64_t q = q_lo; q < q_hi; ++q)
              for (int64_t l = 0; l < len; l += simd::line_elems<T>) __builtin_prefetch(ahead[a] + q * C + c0 + l);
        }
        if (iw0 >= 0 && iw0 + Cols::inputs(pn) <= W)
          strip3_any<T, Cols, false, P>(pn, o, xrows, wrows, nr, bias, c0, len, C, iw0, W);
        else
          strip3_any<T, Cols, true, P>(pn, o, xrows, wrows, nr, bias, c0, len, C, iw0, W);
      };
      for (int64_t ow = 0; ow < OW; ow += P)
        for (int64_t c0 = 0; c0 < C; c0 += B) run(c0, ow);
    }
  }
}

template <typename T, class Cols>
void forward_nhwc_strips(const T* x, const T* wpk, const T* bias, T* out, int64_t N, int64_t H, int64_t W, int64_t C,
                         int64_t OH, int64_t OW, int64_t KH, int64_t pad_w, const TapTable& rows) {
  static_assert(kStripPixels % 2 == 0 && kWideStripPixels % 2 == 0, "TransposedCols2 needs strips of even length");
  if constexpr (sizeof(strip_vec_t<T>) == 64) {
    if (C * static_cast<int64_t>(sizeof(T)) >= kWideStripBytes)
      return forward_nhwc_strips_of<T, Cols, kWideStripPixels>(x, wpk, bias, out, N, H, W, C, OH, OW, KH, pad_w,
                                                               rows);
  }
  forward_nhwc_strips_of<T, Cols, kStripPixels>(x, wpk, bias, out, N, H, W, C, OH, OW, KH, pad_w, rows);
}


// ---------------------------------------------------------------------------------------------------------------
// NCHW through the NHWC strips (float, AVX2 without AVX-512)
//
// The NCHW plane kernels vectorize along a row, so MobileNet's short rows (7 to 56 wide) are mostly borders and
// partial vectors, and under AVX2 the masked loads that would cover them are slow (see planes::Isa). Here each
// thread instead takes B = kChannelPack planes of one image at a time (the B channels of one weight block),
// interleaves them into a pixel-major scratch [H][W][B] (8 x 8 register transposes), runs the register-blocked NHWC
// strips over it with C = B, and de-interleaves the [OH][OW][B] result into the B output planes. Up to 64 x 64
// pixels the scratch pair stays in L2 (H*W*B floats each), so the two transposes cost cache bandwidth only; larger
// planes go kRingRows rows at a time through a ring of the input rows in use (the input gradient's; the forward
// keeps its plane kernels there). The strips then see no row borders but the padding columns, and every lane of
// every vector is a real channel. The input gradient takes the same path (the strips' transposed column taps at
// stride 2, the flipped kernel at stride 1), as it does in NHWC.
constexpr int64_t kBlockedMaxPlane = 64 * 64;  // pixels per plane: H*W*B floats of scratch (256 KiB at 64 x 64)
// Rows per transpose run on larger planes. Against one row at a time, C 32 112x112 stride 1 / C 64 stride 2 (the
// forward, when it took the ring, Zen 3, fastest of 30 alternating calls, 4 runs): 1.05-1.15x / 1.0-1.1x; 16 rows:
// no further gain.
constexpr int64_t kRingRows = 8;

#if defined(__AVX2__) && defined(__FMA__)
// In-register transpose of eight rows of eight floats.
inline void transpose8(__m256& r0, __m256& r1, __m256& r2, __m256& r3, __m256& r4, __m256& r5, __m256& r6,
                       __m256& r7) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r0 = _mm256_permute2f128_ps(u0, u4, 0x20);
  r1 = _mm256_permute2f128_ps(u1, u5, 0x20);
  r2 = _mm256_permute2f128_ps(u2, u6, 0x20);
  r3 = _mm256_permute2f128_ps(u3, u7, 0x20);
  r4 = _mm256_permute2f128_ps(u0, u4, 0x31);
  r5 = _mm256_permute2f128_ps(u1, u5, 0x31);
  r6 = _mm256_permute2f128_ps(u2, u6, 0x31);
  r7 = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// dst[p * ld + c] = src[c * plane + p] for p < n, c < 8: eight planes into eight channels of a pixel-major buffer.
inline void interleave8(const float* src, int64_t plane, int64_t n, float* dst, int64_t ld) {
  int64_t p = 0;
  for (; p + 8 <= n; p += 8) {
    __m256 r[8];
    for (int c = 0; c < 8; ++c) r[c] = _mm256_loadu_ps(src + c * plane + p);
    transpose8(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]);
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (p + i) * ld, r[i]);
  }
  for (; p < n; ++p)
    for (int c = 0; c < 8; ++c) dst[p * ld + c] = src[c * plane + p];
}

// dst[c * plane + p] = src[p * ld + c] for p < n, c < 8: the inverse of interleave8.
inline void deinterleave8(const float* src, int64_t ld, int64_t n, float* dst, int64_t plane) {
  int64_t p = 0;
  for (; p + 8 <= n; p += 8) {
    __m256 r[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (p + i) * ld);
    transpose8(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]);
    for (int c = 0; c < 8; ++c) _mm256_storeu_ps(dst + c * plane + p, r[c]);
  }
  for (; p < n; ++p)
    for (int c = 0; c < 8; ++c) dst[c * plane + p] = src[p * ld + c];
}

// out [N, C, OH, OW] from x [N, C, H, W]: forward_nhwc_strips_of's problem (same arguments) over NCHW tensors.
template <class Cols>
void nchw_strips(const float* x, const float* wpk, const float* bias, float* out, int64_t N, int64_t H, int64_t W,
                 int64_t C, int64_t OH, int64_t OW, int64_t KH, int64_t pad_w, const TapTable& rows) {
  constexpr int64_t B = kChannelPack<float>;
  constexpr int P = kStripPixels;
  static_assert(B % 8 == 0, "whole 8 x 8 transposes per block");
  const int64_t KK = KH * 3, HW = H * W, OHW = OH * OW;
  const int64_t groups = (C + B - 1) / B;
  std::vector<float> bpk(groups * B, 0.f);
  if (bias) std::copy(bias, bias + C, bpk.begin());
  // Small planes are interleaved whole (one long run of transposes). Large ones go F rows at a time into a ring
  // that holds the rows an output row reads plus F - 1, and the output rows are de-interleaved F at a time.
  const bool whole = HW <= kBlockedMaxPlane;
  int64_t span = 1;
  for (int64_t o = 0; o < OH; ++o) {
    int64_t lo = H, hi = -1;
    for (int64_t a = 0; a < rows.count[o]; ++a) {
      lo = std::min(lo, rows.pos[o * rows.K + a]);
      hi = std::max(hi, rows.pos[o * rows.K + a]);
    }
    span = std::max(span, hi - lo + 1);
  }
  const int64_t F = whole ? H : kRingRows;
  const int64_t FO = whole ? OH : F;
  const int64_t ring = whole ? H : (span + F - 1 + F - 1) / F * F;
#pragma omp parallel
  {
    std::vector<float> xin(ring * W * B), yout(FO * OW * B), part(8 * std::max(HW, OHW), 0.f);
    // Input rows [r0, r1) of the block's len channels (planes of xg) into their ring slots (r0 a multiple of F).
    auto fill = [&](const float* xg, int64_t len, int64_t r0, int64_t r1) {
      const int64_t npix = (r1 - r0) * W;
      float* dst = xin.data() + (r0 % ring) * W * B;
      for (int64_t e = 0; e < B; e += 8) {
        if (e + 8 <= len) {
          interleave8(xg + e * HW + r0 * W, HW, npix, dst + e, B);
        } else {  // channels past C: zero planes (their outputs are dropped)
          std::fill(part.begin(), part.begin() + 8 * npix, 0.f);
          for (int64_t c = e; c < len; ++c)
            std::copy(xg + c * HW + r0 * W, xg + c * HW + r1 * W, part.data() + (c - e) * npix);
          interleave8(part.data(), npix, npix, dst + e, B);
        }
      }
      // The next F rows: 16 planes' rows are more streams than the prefetchers follow (measured on a 2-core AMD
      // EPYC Zen 3 at C 32 112x112 stride 1: 1.13x).
      if (!whole)
        for (int64_t c = 0; c < len; ++c)
          for (int64_t l = r1 * W; l < std::min(H, r1 + F) * W; l += simd::line_elems<float>)
            __builtin_prefetch(xg + c * HW + l);
    };
    // Output rows [o0, o1), computed into yout, into the block's len planes of og.
    auto drain = [&](float* og, int64_t len, int64_t o0, int64_t o1) {
      const int64_t npix = (o1 - o0) * OW;
      for (int64_t e = 0; e < len; e += 8) {
        if (e + 8 <= len) {
          deinterleave8(yout.data() + e, B, npix, og + e * OHW + o0 * OW, OHW);
        } else {
          deinterleave8(yout.data() + e, B, npix, part.data(), npix);
          for (int64_t c = e; c < len; ++c)
            std::copy(part.data() + (c - e) * npix, part.data() + (c - e + 1) * npix, og + c * OHW + o0 * OW);
        }
      }
    };
#pragma omp for collapse(2) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t c0 = g * B, len = std::min(B, C - c0);
        const float* xg = x + (n * C + c0) * HW;
        float* og = out + (n * C + c0) * OHW;
        const float* wg = wpk + g * KK * B;
        int64_t filled = 0;  // input rows below this one have been through the ring
        for (int64_t oh = 0; oh < OH; ++oh) {
          const int nr = static_cast<int>(rows.count[oh]);
          int64_t last = -1;
          for (int a = 0; a < nr; ++a) last = std::max(last, rows.pos[oh * rows.K + a]);
          for (; filled <= last; filled += F) fill(xg, len, filled, std::min(H, filled + F));
          const float* xrows[kStripMaxRows];
          const float* wrows[kStripMaxRows];
          for (int a = 0; a < nr; ++a) {
            xrows[a] = xin.data() + (rows.pos[oh * rows.K + a] % ring) * W * B;
            wrows[a] = wg + rows.k[oh * rows.K + a] * 3 * B;
          }
          float* orow = yout.data() + (oh % FO) * OW * B;
          for (int64_t ow = 0; ow < OW; ow += P) {
            const int pn = static_cast<int>(std::min<int64_t>(P, OW - ow));
            const int64_t iw0 = Cols::first(ow, pad_w);
            if (iw0 >= 0 && iw0 + Cols::inputs(pn) <= W)
              strip3_any<float, Cols, false, P>(pn, orow + ow * B, xrows, wrows, nr, bpk.data() + c0, 0, B, B, iw0, W);
            else
              strip3_any<float, Cols, true, P>(pn, orow + ow * B, xrows, wrows, nr, bpk.data() + c0, 0, B, B, iw0, W);
          }
          if ((oh + 1) % FO == 0 || oh + 1 == OH) drain(og, len, oh / FO * FO, oh + 1);
        }
      }
    }
  }
}
#endif

// Whether the register-blocked strips take a problem of this layout: every NHWC one strip3_applies to, and under
// AVX2 without AVX-512 the float NCHW ones too (through nchw_strips). C++ harness (benchmarks/cpu_harness), batch
// 8, 2 threads, 2-core AMD EPYC Zen 3 VM, against the NCHW kernels they replace, fastest of 3-4 interleaved rounds
// in two sessions, MobileNetV1's layers (s1 / s2): forward C 128 56x56 1.21-1.49 / 1.40-1.70x, C 256 28x28
// 1.22-1.34 / 1.42-1.65x, C 512 14x14 1.58-1.85 / 1.89-2.28x, C 1024 7x7 1.85-2.40x; input gradient C 32 / 64
// 112x112 1.03-1.11 / 2.68-3.22x, C 128 56x56 1.32-1.39 / 2.88-2.99x, C 256 28x28 1.27-1.44 / 2.69-3.48x, C 512
// 14x14 1.59-1.99 / 4.53-4.85x, C 1024 7x7 3.54-3.73x. Under AVX-512 the plane kernels keep NCHW: their masked chunks cover short rows there, and this path has
// not been measured on such a machine.
template <typename T>
bool strips_take(const Conv2dShape& s, Layout layout) {
  if (!strip3_applies(s)) return false;
  if (layout == Layout::NHWC) return true;
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
  return std::is_same_v<T, float>;
#else
  return false;
#endif
}

// forward_nhwc_strips, or its NCHW counterpart, by layout (where strips_take).
template <typename T, class Cols>
void run_strips(Layout layout, const T* x, const T* wpk, const T* bias, T* out, int64_t N, int64_t H, int64_t W,
                int64_t C, int64_t OH, int64_t OW, int64_t KH, int64_t pad_w, const TapTable& rows) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<T, float>) {
    if (layout == Layout::NCHW) return nchw_strips<Cols>(x, wpk, bias, out, N, H, W, C, OH, OW, KH, pad_w, rows);
  }
#endif
  forward_nhwc_strips<T, Cols>(x, wpk, bias, out, N, H, W, C, OH, OW, KH, pad_w, rows);
}
// [C, KH*KW] -> [KH*KW, C]
template <typename T>
std::vector<T> taps_major(const T* weight, int64_t C, int64_t KK) {
  std::vector<T> wt(KK * C);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < KK; ++k) wt[k * C + c] = weight[c * KK + k];
  return wt;
}

template <typename T>
void backward_weight_nhwc(const T* grad_out, const T* x, T* grad_weight, const Conv2dShape& s) {
  // Threads own channel blocks; a block of 16 floats is one cache line of each pixel.
  constexpr int64_t CB = 64 / sizeof(T);
  const int64_t KK = s.KH * s.KW, C = s.C;
  const TapTable rows = forward_taps(s.OH, s.H, s.KH, s.stride_h, s.pad_h, s.dil_h);
  const TapTable cols = forward_taps(s.OW, s.W, s.KW, s.stride_w, s.pad_w, s.dil_w);
  const int64_t n_blocks = (C + CB - 1) / CB;
#pragma omp parallel
  {
    std::vector<T> acc(KK * CB);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t c0 = blk * CB, len = std::min(CB, C - c0);
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t n = 0; n < s.N; ++n) {
        const T* xn = x + n * s.H * s.W * C + c0;
        for (int64_t oh = 0; oh < s.OH; ++oh) {
          const T* grow = grad_out + (n * s.OH + oh) * s.OW * C + c0;
          for (int64_t a = 0; a < rows.count[oh]; ++a) {
            const int64_t kh = rows.k[oh * s.KH + a];
            const T* xrow = xn + rows.pos[oh * s.KH + a] * s.W * C;
            for (int64_t ow = 0; ow < s.OW; ++ow) {
              const T* g = grow + ow * C;
              for (int64_t b = 0; b < cols.count[ow]; ++b) {
                const T* xp = xrow + cols.pos[ow * s.KW + b] * C;
                T* ap = acc.data() + (kh * s.KW + cols.k[ow * s.KW + b]) * CB;
                if (len == CB) {
#pragma omp simd
                  for (int64_t j = 0; j < CB; ++j) ap[j] += g[j] * xp[j];
                } else {
                  for (int64_t j = 0; j < len; ++j) ap[j] += g[j] * xp[j];
                }
              }
            }
          }
        }
      }
      for (int64_t j = 0; j < len; ++j)
        for (int64_t k = 0; k < KK; ++k) grad_weight[(c0 + j) * KK + k] = acc[k * CB + j];
    }
  }
}

// grad_weight for 3x3 kernels (dilation 1) in NHWC: the nine tap sums of one vector of channels live in nine
// registers while the task sweeps its pixels, one grad_out load feeding nine FMAs. The generic loop above kept the
// sums in memory (a load and a store per FMA) and ran 2-5x slower than PyTorch's whole backward.
//
// A task is a band of output rows of one image. A channel vector's sweep touches one cache line per pixel of the
// band's grad_out and input rows, which the next vector (with 8-float vectors, the line's other half) reads again:
// about 1024 pixels keeps those lines in L2, and the band is halved while there are fewer than four tasks per
// thread. Every task writes its own partial [9][C] sums, reduced afterwards in task order: deterministic for a
// given problem and thread count. Kernel rows that fall in the padding read a row of zeros, so every output row
// runs the same nine-tap loop; columns that reach into the padding (at most two per row) check their taps.
//
// The channel vector is the widest (16 floats under AVX-512), and the interior runs two pixels at a time into two
// sets of nine sums. C++ harness, batch 8, 2 threads, 2-core Sapphire Rapids VM, medians of 6 interleaved runs
// against 8-float vectors one pixel at a time, MobileNetV1's 9 shapes: 1.16-1.46x (C 32 112x112 1.46, C 128 56x56
// s2 1.43, C 1024 7x7 1.42, C 256 28x28 s2 1.16); the widest vectors alone gave 1.10-1.42x.
constexpr int64_t kBandPixels = 1024;

// Nine tap sums over the band's pixels for channels [c, c + lanes(V)); zero is a zero input row.
template <typename T, typename V, int S>
inline void bw3x3_vector(const T* g, const T* x, const T* zero, T* partial, const Conv2dShape& s, int64_t n,
                         int64_t oh0, int64_t oh1, int64_t ow_lo, int64_t ow_hi, int64_t c) {
  const int64_t C = s.C;
  V acc[9], acc2[9];
#pragma GCC unroll 9
  for (int k = 0; k < 9; ++k) acc[k] = acc2[k] = V{};
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const T* xr[3];
    for (int kh = 0; kh < 3; ++kh) {
      const int64_t ih = oh * s.stride_h - s.pad_h + kh;
      xr[kh] = (ih >= 0 && ih < s.H ? x + ((n * s.H + ih) * s.W) * C : zero) + c;
    }
    const T* grow = g + ((n * s.OH + oh) * s.OW) * C + c;
    auto checked = [&](int64_t ow) {
      const V gv = simd::load<V>(grow + ow * C);
#pragma GCC unroll 3
      for (int kh = 0; kh < 3; ++kh)
#pragma GCC unroll 3
        for (int kw = 0; kw < 3; ++kw) {
          const int64_t iw = ow * S - s.pad_w + kw;
          if (iw >= 0 && iw < s.W) acc[kh * 3 + kw] = simd::fmadd(gv, simd::load<V>(xr[kh] + iw * C), acc[kh * 3 + kw]);
        }
    };
    for (int64_t ow = 0; ow < ow_lo; ++ow) checked(ow);
    int64_t ow = ow_lo;
    // Two pixels at a time into two sets of sums: 18 independent FMA chains, and the input vectors the two pixels
    // share (3 - S per kernel row) loaded once.
    for (; ow + 2 <= ow_hi; ow += 2) {
      const V g0 = simd::load<V>(grow + ow * C), g1 = simd::load<V>(grow + (ow + 1) * C);
      const int64_t off = (ow * S - s.pad_w) * C;
#pragma GCC unroll 3
      for (int kh = 0; kh < 3; ++kh) {
        const T* xp = xr[kh] + off;
        V xv[S + 3];
#pragma GCC unroll 5
        for (int j = 0; j < S + 3; ++j) xv[j] = simd::load<V>(xp + j * C);
#pragma GCC unroll 3
        for (int kw = 0; kw < 3; ++kw) {
          acc[kh * 3 + kw] = simd::fmadd(g0, xv[kw], acc[kh * 3 + kw]);
          acc2[kh * 3 + kw] = simd::fmadd(g1, xv[kw + S], acc2[kh * 3 + kw]);
        }
      }
    }
    for (; ow < ow_hi; ++ow) {
      const V gv = simd::load<V>(grow + ow * C);
      const int64_t off = (ow * S - s.pad_w) * C;
#pragma GCC unroll 3
      for (int kh = 0; kh < 3; ++kh) {
        const T* xp = xr[kh] + off;
        acc[kh * 3 + 0] = simd::fmadd(gv, simd::load<V>(xp), acc[kh * 3 + 0]);
        acc[kh * 3 + 1] = simd::fmadd(gv, simd::load<V>(xp + C), acc[kh * 3 + 1]);
        acc[kh * 3 + 2] = simd::fmadd(gv, simd::load<V>(xp + 2 * C), acc[kh * 3 + 2]);
      }
    }
    for (int64_t ow = std::max(ow_hi, ow_lo); ow < s.OW; ++ow) checked(ow);
  }
#pragma GCC unroll 9
  for (int k = 0; k < 9; ++k) simd::store(partial + k * C + c, acc[k] + acc2[k]);
}

template <typename T, int S>
void backward_weight_nhwc_3x3(const T* grad_out, const T* x, T* grad_weight, const Conv2dShape& s) {
  using W = simd::wide_t<T>;
  using V = simd::vec_t<T>;
  constexpr int64_t LW = simd::lanes<T, W>, L = simd::lanes<T, V>;
  const int64_t C = s.C;
  int64_t rows = std::clamp<int64_t>(kBandPixels / s.OW, 1, s.OH);
  while (rows > 1 && s.N * ((s.OH + rows - 1) / rows) < 4 * omp_get_max_threads()) rows = (rows + 1) / 2;
  const int64_t bands = (s.OH + rows - 1) / rows, tasks = s.N * bands;
  // Interior output columns: all three taps inside the row.
  int64_t ow_lo = 0, ow_hi = 0, lo2, hi2;
  valid_outputs(0, s.W, s.OW, S, s.pad_w, 1, ow_lo, ow_hi);
  valid_outputs(2, s.W, s.OW, S, s.pad_w, 1, lo2, hi2);
  ow_lo = std::max(ow_lo, lo2);
  ow_hi = std::max(ow_lo, std::min(ow_hi, hi2));
  const std::vector<T> zero(s.W * C, T(0));
  std::vector<T> partial(tasks * 9 * C);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t n = t / bands, oh0 = (t % bands) * rows, oh1 = std::min(s.OH, oh0 + rows);
    T* pt = partial.data() + t * 9 * C;
    int64_t c = 0;
    if constexpr (LW > L) {
      for (; c + LW <= C; c += LW)
        bw3x3_vector<T, W, S>(grad_out, x, zero.data(), pt, s, n, oh0, oh1, ow_lo, ow_hi, c);
    }
    for (; c + L <= C; c += L)
      bw3x3_vector<T, V, S>(grad_out, x, zero.data(), pt, s, n, oh0, oh1, ow_lo, ow_hi, c);
    for (; c < C; ++c) bw3x3_vector<T, T, S>(grad_out, x, zero.data(), pt, s, n, oh0, oh1, ow_lo, ow_hi, c);
  }
  // grad_weight[c][k] = the partials summed in task order (into task 0's, along contiguous channels).
  T* total = partial.data();
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < 9; ++k)
    for (int64_t t = 1; t < tasks; ++t) {
      const T* pt = partial.data() + (t * 9 + k) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) total[k * C + c] += pt[c];
    }
  for (int64_t c = 0; c < C; ++c)
    for (int k = 0; k < 9; ++k) grad_weight[c * 9 + k] = total[k * C + c];
}

}  // namespace

template <typename T>
void depthwise_conv2d_forward(const T* x, const T* weight, const T* bias, T* out, const Conv2dShape& s,
                              Layout layout) {
  // NCHW planes above kBlockedMaxPlane stay on forward_nchw: through the ring the C 32 112x112 stride 1 and C 64
  // stride 2 forwards measured 0.97 / 0.93x (fastest of 8 interleaved harness rounds), while the input gradient
  // gains there (below).
  if (strips_take<T>(s, layout) && (layout == Layout::NHWC || s.H * s.W <= kBlockedMaxPlane)) {
    const TapTable rows = forward_taps(s.OH, s.H, s.KH, s.stride_h, s.pad_h, s.dil_h);
    const std::vector<T> wpk = pack_channel_blocks(weight, s.C, s.KH * s.KW);
    if (s.stride_w == 1)
      run_strips<T, ForwardCols<1>>(layout, x, wpk.data(), bias, out, s.N, s.H, s.W, s.C, s.OH, s.OW, s.KH, s.pad_w,
                                    rows);
    else
      run_strips<T, ForwardCols<2>>(layout, x, wpk.data(), bias, out, s.N, s.H, s.W, s.C, s.OH, s.OW, s.KH, s.pad_w,
                                    rows);
    return;
  }
  if (layout == Layout::NCHW) {
    forward_nchw(x, weight, bias, out, s);
    return;
  }
  const TapTable rows = forward_taps(s.OH, s.H, s.KH, s.stride_h, s.pad_h, s.dil_h);
  const std::vector<T> wt = taps_major(weight, s.C, s.KH * s.KW);
  const TapTable cols = forward_taps(s.OW, s.W, s.KW, s.stride_w, s.pad_w, s.dil_w);
  gather_nhwc(x, s.H, s.W, wt.data(), bias, out, s.OH, s.OW, s.N, s.C, s.KW, rows, cols, s.stride_w);
}

template <typename T>
void depthwise_conv2d_backward_input(const T* grad_out, const T* weight, T* grad_x, const Conv2dShape& s,
                                     Layout layout) {
  if (s.stride_h == 1 && s.stride_w == 1 && strips_take<T>(s, layout)) {
    // At stride 1 the transposed convolution is a correlation of grad_out with the flipped kernel and padding
    // dil*(K-1) - pad, so the register-blocked forward strips run it (2-3x the tap-table gather below).
    const int64_t KK = s.KH * s.KW;
    std::vector<T> flipped(s.C * KK);
    for (int64_t c = 0; c < s.C; ++c)
      for (int64_t k = 0; k < KK; ++k) flipped[c * KK + k] = weight[c * KK + KK - 1 - k];
    const std::vector<T> wpk = pack_channel_blocks(flipped.data(), s.C, KK);
    const TapTable rows = forward_taps(s.H, s.OH, s.KH, 1, s.dil_h * (s.KH - 1) - s.pad_h, s.dil_h);
    run_strips<T, ForwardCols<1>>(layout, grad_out, wpk.data(), static_cast<const T*>(nullptr), grad_x, s.N, s.OH,
                                  s.OW, s.C, s.H, s.W, s.KH, s.KW - 1 - s.pad_w, rows);
    return;
  }
  if (s.stride_w == 2 && strips_take<T>(s, layout)) {
    // The same strips with the stride-2 transposed column taps (TransposedCols2) and unflipped weights.
    const std::vector<T> wpk = pack_channel_blocks(weight, s.C, s.KH * s.KW);
    const TapTable rows = transposed_taps(s.H, s.OH, s.KH, s.stride_h, s.pad_h, s.dil_h);
    const T* none = nullptr;
    if (s.pad_w % 2)
      run_strips<T, TransposedCols2<1>>(layout, grad_out, wpk.data(), none, grad_x, s.N, s.OH, s.OW, s.C, s.H, s.W,
                                        s.KH, s.pad_w, rows);
    else
      run_strips<T, TransposedCols2<2>>(layout, grad_out, wpk.data(), none, grad_x, s.N, s.OH, s.OW, s.C, s.H, s.W,
                                        s.KH, s.pad_w, rows);
    return;
  }
  if (layout == Layout::NCHW) {
    backward_input_nchw(grad_out, weight, grad_x, s);
    return;
  }
  const std::vector<T> wt = taps_major(weight, s.C, s.KH * s.KW);
  const TapTable rows = transposed_taps(s.H, s.OH, s.KH, s.stride_h, s.pad_h, s.dil_h);
  const TapTable cols = transposed_taps(s.W, s.OW, s.KW, s.stride_w, s.pad_w, s.dil_w);
  gather_nhwc(grad_out, s.OH, s.OW, wt.data(), static_cast<const T*>(nullptr), grad_x, s.H, s.W, s.N, s.C, s.KW,
              rows, cols, s.stride_w == 1 ? 1 : 0);
}

template <typename T>
void depthwise_conv2d_backward_weight(const T* grad_out, const T* x, T* grad_weight, const Conv2dShape& s,
                                      Layout layout) {
  if (layout == Layout::NCHW) {
    backward_weight_nchw(grad_out, x, grad_weight, s);
  } else if (s.KH == 3 && s.KW == 3 && s.dil_h == 1 && s.dil_w == 1 && s.stride_w <= 2) {
    if (s.stride_w == 1) backward_weight_nhwc_3x3<T, 1>(grad_out, x, grad_weight, s);
    else backward_weight_nhwc_3x3<T, 2>(grad_out, x, grad_weight, s);
  } else {
    backward_weight_nhwc(grad_out, x, grad_weight, s);
  }
}

#define PYVL_INSTANTIATE(T)                                                                                   \
  template void depthwise_conv2d_forward<T>(const T*, const T*, const T*, T*, const Conv2dShape&, Layout);  \
  template void depthwise_conv2d_backward_input<T>(const T*, const T*, T*, const Conv2dShape&, Layout);     \
  template void depthwise_conv2d_backward_weight<T>(const T*, const T*, T*, const Conv2dShape&, Layout);
PYVL_INSTANTIATE(float)
PYVL_INSTANTIATE(double)
#undef PYVL_INSTANTIATE

}  // namespace cpu
}  // namespace pyvl
