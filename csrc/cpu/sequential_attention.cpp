// Sequential attention, CPU: flash-attention's tiling with the project's register-blocked GEMM micro-kernel.
//
// Every product is a GEMM on small packed tiles (gemm_micro: 6 x 16 accumulators, AVX2 FMA for float):
//   forward   S = Q K^T, O += P V                            one pass over the keys per query block
//   backward  (A) per key block:   dV += P^T dO, dK += dS^T Q (owns its dK, dV rows)
//             (B) per query block: dQ += dS K, dbias += dS    (owns its dQ rows and its dbias rows)
// with P = exp(scale * S + bias - lse) and dS = P * (dO V^T - rowsum(dO * O)) recomputed in both passes. Two
// passes cost one more Q K^T and dO V^T than a single pass with atomics, but every output has one owner: no
// atomics, no per-thread partial buffers, and sums in a fixed order whatever the thread count.
//
// Tiles are zero-padded to the micro-kernel's 6 x 16 grid, so partial blocks need no separate code path. The
// element-wise work (scale, bias, exp, dS) runs over span(nk) = nk rounded up to 48 columns, not the whole kBK:
// at Graphormer's 30-50 nodes a full 96-wide row was half or more padding.
//
// When there are at least two bias groups per thread (a group is a head when no bias gradient is wanted), the
// backward takes a single pass instead of (A) + (B): one task per group computes each of its heads' P and dS tiles
// once and derives dV, dK, dQ and dbias from them. (With fewer groups that pass would leave threads idle: a bias
// shared by every head is one group, one task.) Each head belongs to one group, so
// the task owns every output it writes. Both paths add every sum in the same order (query blocks, key blocks,
// heads in (b, h) order), so they give bitwise the same result; tests/test_sequential_attention.py checks it
// across thread counts, which switch between them.
#include "cpu/sequential_attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/gemm_microkernel.h"
#include "cpu/simd.h"

namespace pyvl {
namespace cpu {
namespace {

constexpr int64_t kBQ = 48;  // query rows per block: a multiple of kGemmMR
constexpr int64_t kBK = 96;  // keys per block: a multiple of kGemmMR, kGemmNR and 8 (the exp vector width)
static_assert(kBQ % kGemmMR == 0 && kBK % kGemmMR == 0 && kBK % kGemmNR == 0 && kBK % 8 == 0, "tile sizes");

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Columns of a tile row that the element-wise passes touch: nk rounded up to a multiple of both kGemmMR and
// kGemmNR (so it covers the columns any GEMM reads or writes) and of the 8-lane exp.
constexpr int64_t kSpanStep = 48;
static_assert(kBK % kSpanStep == 0 && kSpanStep % kGemmMR == 0 && kSpanStep % kGemmNR == 0 && kSpanStep % 8 == 0,
              "span step");
inline int64_t span(int64_t nk) { return std::min(kBK, round_up(nk, kSpanStep)); }

// ---------------------------------------------------------------------------------------------------------------
// x[j] = exp(x[j] - shift) over a row, returning the sum of the results (in T, lane-parallel partial sums, a fixed
// order). float: simd::exp on the build's widest vectors, 16 lanes under AVX-512 (Cephes' expf, about 1 ulp); glibc
// only vectorizes exp under -ffast-math, which would also break the NaN policy. exp(-inf) = 0 and NaN stays NaN.
// The rows are span() long, a multiple of 16, so the scalar tail does not run.
// The subtraction, exp and sum go in one pass over the row. Against three passes with 8-lane exp (2-core AMD EPYC
// Zen 5, B 1, 4 heads, d 32, bias [N, N], fastest of 7 calls, 3 interleaved rounds): forward 1.17-1.35x at N = 4096,
// 1.15x at N = 1024; forward + backward 1.11x at N = 4096.
template <typename T>
inline T exp_shifted_row(T* x, int64_t n, T shift) {
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (x[j] = std::exp(x[j] - shift));
  return sum;
}

#if defined(__AVX2__) && defined(__FMA__)

template <>
inline float exp_shifted_row<float>(float* x, int64_t n, float shift) {
  float sum = 0, unused = 0;
  int64_t j = simd::exp_shifted_rows<simd::F32xW>(x, nullptr, shift, 0.f, 0, n, sum, unused);  // 16 lanes: AVX-512
  for (; j < n; ++j) sum += (x[j] = std::exp(x[j] - shift));
  return sum;
}
#endif

// ---------------------------------------------------------------------------------------------------------------
// Tiles

// C[rows][ldc] (=, or += when accumulate) = A . B over K, for the first `rows` rows (a multiple of kGemmMR) and
// `cols` columns (a multiple of kGemmNR); A and B as gemm_micro reads them.
template <typename T>
void tile_gemm(int64_t rows, int64_t cols, int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B,
               int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  T acc[kGemmMR][kGemmNR];
  for (int64_t i0 = 0; i0 < rows; i0 += kGemmMR) {
    for (int64_t j0 = 0; j0 < cols; j0 += kGemmNR) {
      gemm_micro<T>(K, A + i0 * a_rs, a_rs, a_ks, B + j0, ldb, acc);
      for (int i = 0; i < kGemmMR; ++i) {
        T* c = C + (i0 + i) * ldc + j0;
        if (accumulate) {
#pragma omp simd
          for (int j = 0; j < kGemmNR; ++j) c[j] += acc[i][j];
        } else {
#pragma omp simd
          for (int j = 0; j < kGemmNR; ++j) c[j] = acc[i][j];
        }
      }
    }
  }
}

// dst[rows_pad][ldd] = src rows [0, rows) x cols [0, cols) (row stride src_ld), zero elsewhere.
template <typename T>
void pack_rows(const T* src, int64_t src_ld, int64_t rows, int64_t cols, T* dst, int64_t rows_pad, int64_t ldd) {
  for (int64_t r = 0; r < rows_pad; ++r) {
    T* d = dst + r * ldd;
    if (r < rows) {
      const T* s = src + r * src_ld;
      for (int64_t c = 0; c < cols; ++c) d[c] = s[c];
      for (int64_t c = cols; c < ldd; ++c) d[c] = T(0);
    } else {
      for (int64_t c = 0; c < ldd; ++c) d[c] = T(0);
    }
  }
}

// dst[cols][kBK] = the transpose of src rows [0, rows) (row stride src_ld, `cols` columns), zero-padded to
// span(rows) (the columns a tile GEMM reads).
template <typename T>
void pack_transposed(const T* src, int64_t src_ld, int64_t rows, int64_t cols, T* dst) {
  for (int64_t c = 0, e = span(rows); c < cols; ++c) {
    T* d = dst + c * kBK;
    for (int64_t r = 0; r < rows; ++r) d[r] = src[r * src_ld + c];
    for (int64_t r = rows; r < e; ++r) d[r] = T(0);
  }
}

// row[j] = scale * row[j] + bias[j * sm] for j < nk (bias may be null), -inf for nk <= j < span(nk).
template <typename T>
inline void scale_and_bias(T* row, int64_t nk, T scale, const T* bias, int64_t sm) {
  if (bias == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < nk; ++j) row[j] *= scale;
  } else if (sm == 1) {
#pragma omp simd
    for (int64_t j = 0; j < nk; ++j) row[j] = row[j] * scale + bias[j];
  } else {
    const T b = bias[0];
#pragma omp simd
    for (int64_t j = 0; j < nk; ++j) row[j] = row[j] * scale + b;
  }
  for (int64_t j = nk, e = span(nk); j < e; ++j) row[j] = -std::numeric_limits<T>::infinity();
}

template <typename T>
const T* bias_row(const BiasView<T>& bias, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (bias.data == nullptr) return nullptr;
  return bias.data + b * bias.sb + h * bias.sh + i * bias.sn + j * bias.sm;
}

// Per-thread buffers of one (query block, key block) tile and the packed operands around it.
template <typename T>
struct Scratch {
  int64_t Dp, DVp;  // D and DV rounded up to kGemmNR
  std::vector<T> q, o_or_do, kt, vt, kv, p, dp, acc;
  Scratch(const AttentionShape& s)
      : Dp(round_up(s.D, kGemmNR)), DVp(round_up(s.DV, kGemmNR)),
        q(kBQ * Dp), o_or_do(kBQ * DVp), kt(s.D * kBK), vt(s.DV * kBK), kv(kBK * std::max(Dp, DVp)),
        p(kBQ * kBK), dp(kBQ * kBK), acc(std::max(kBQ, kBK) * std::max(Dp, DVp)) {}
};

// The P and dS tiles of query rows [q0, q0+nq) x keys [k0, k0+nk) of head (b, h), from the packed q (sc.q),
// dO (sc.o_or_do), k^T (kt, default sc.kt) and v^T (vt, default sc.vt):
// P = exp(scale * q k^T + bias - lse), dS = P * (dO v^T - delta). Entries outside the tile are 0 in both.
template <typename T>
void prob_and_grad_tile(Scratch<T>& sc, const BiasView<T>& bias, const T* lse, const T* delta, int64_t b, int64_t h,
                        int64_t q0, int64_t nq, int64_t k0, int64_t nk, const AttentionShape& s,
                        const T* kt = nullptr, const T* vt = nullptr) {
  if (kt == nullptr) kt = sc.kt.data();
  if (vt == nullptr) vt = sc.vt.data();
  const T scale = T(s.scale);
  const int64_t rows = round_up(nq, kGemmMR), cols = round_up(nk, kGemmNR), w = span(nk);
  T* P = sc.p.data();
  T* dS = sc.dp.data();
  tile_gemm<T>(rows, cols, s.D, sc.q.data(), sc.Dp, 1, kt, kBK, P, kBK, false);
  tile_gemm<T>(rows, cols, s.DV, sc.o_or_do.data(), sc.DVp, 1, vt, kBK, dS, kBK, false);
  for (int64_t i = 0; i < nq; ++i) {
    T* p = P + i * kBK;
    T* ds = dS + i * kBK;
    scale_and_bias(p, nk, scale, bias_row(bias, b, h, q0 + i, k0), bias.sm);
    exp_shifted_row(p, w, lse[i]);
    const T d = delta[i];
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) ds[j] = j < nk ? p[j] * (ds[j] - d) : T(0);
  }
  // Rows past nq, up to the micro-kernel's row grid: read as zeros by the dQ product.
  for (int64_t i = nq; i < rows; ++i)
    for (int64_t j = 0; j < w; ++j) P[i * kBK + j] = dS[i * kBK + j] = T(0);
}

// dst[r * ld_dst + c] = src[r * ld_src + c] * f for r < rows, c < cols.
template <typename T>
void store_scaled(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t rows, int64_t cols, T f) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * ld_dst + c] = src[r * ld_src + c] * f;
}

// The single-pass backward: one task per bias group of GB x GH (a head when there is no bias gradient) runs its
// heads in (b, h) order. For each head it packs k and v once, then walks query blocks and, within each, key blocks
// in order, computing each tile's P and dS once and adding dV += P^T dO, dK += dS^T Q, dQ += dS K and dbias += dS
// into buffers the task owns. Used when there are enough groups to keep every thread busy (else the two passes).
template <typename T>
void per_head_backward(const HeadRows<const T>& grad_out, const HeadRows<const T>& q, const HeadRows<const T>& k,
                       const HeadRows<const T>& v, const BiasView<T>& bias, const T* delta, const T* lse,
                       const HeadRows<T>& grad_q, const HeadRows<T>& grad_k, const HeadRows<T>& grad_v, T* grad_bias,
                       int64_t GB, int64_t GH, const AttentionShape& s) {
  const T scale = T(s.scale);
  const int64_t N = s.N, M = s.M, nkb = (M + kBK - 1) / kBK;
#pragma omp parallel
  {
    Scratch<T> sc(s);
    // The head's k^T and v^T as nkb packed [D][kBK] / [DV][kBK] blocks, its k rows, and its dK, dV sums; rows
    // past M up to a whole micro-kernel row block are written by the tile products and never read.
    const int64_t Mp = nkb * kBK;
    std::vector<T> kt(nkb * s.D * kBK), vt(nkb * s.DV * kBK), krow(M * sc.Dp), dk(Mp * sc.Dp), dv(Mp * sc.DVp);
    std::vector<T> dq(kBQ * sc.Dp);
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < GB * GH; ++g) {
      const int64_t gb = g / GH, gh = g % GH;
      T* gbias = grad_bias ? grad_bias + g * N * M : nullptr;
      if (gbias) std::fill(gbias, gbias + N * M, T(0));
      const int64_t b_lo = GB == s.B ? gb : 0, b_hi = GB == s.B ? gb + 1 : s.B;
      const int64_t h_lo = GH == s.H ? gh : 0, h_hi = GH == s.H ? gh + 1 : s.H;
      for (int64_t b = b_lo; b < b_hi; ++b) {
        for (int64_t h = h_lo; h < h_hi; ++h) {
          const int64_t bh = b * s.H + h;
          for (int64_t kb = 0; kb < nkb; ++kb) {
            const int64_t k0 = kb * kBK, nk = std::min(kBK, M - k0);
            pack_transposed(k.row(bh, k0), k.sn, nk, s.D, kt.data() + kb * s.D * kBK);
            pack_transposed(v.row(bh, k0), v.sn, nk, s.DV, vt.data() + kb * s.DV * kBK);
          }
          pack_rows(k.row(bh, 0), k.sn, M, s.D, krow.data(), M, sc.Dp);
          std::fill(dk.begin(), dk.end(), T(0));
          std::fill(dv.begin(), dv.end(), T(0));
          for (int64_t q0 = 0; q0 < N; q0 += kBQ) {
            const int64_t nq = std::min(kBQ, N - q0), rows = round_up(nq, kGemmMR);
            pack_rows(q.row(bh, q0), q.sn, nq, s.D, sc.q.data(), rows, sc.Dp);
            pack_rows(grad_out.row(bh, q0), grad_out.sn, nq, s.DV, sc.o_or_do.data(), rows, sc.DVp);
            std::fill(dq.begin(), dq.begin() + rows * sc.Dp, T(0));
            for (int64_t kb = 0; kb < nkb; ++kb) {
              const int64_t k0 = kb * kBK, nk = std::min(kBK, M - k0), krows = round_up(nk, kGemmMR);
              prob_and_grad_tile(sc, bias, lse + bh * N + q0, delta + bh * N + q0, b, h, q0, nq, k0, nk, s,
                                 kt.data() + kb * s.D * kBK, vt.data() + kb * s.DV * kBK);
              // dV += P^T dO, dK += dS^T Q (A read transposed), dQ += dS K
              tile_gemm<T>(krows, sc.DVp, nq, sc.p.data(), 1, kBK, sc.o_or_do.data(), sc.DVp,
                           dv.data() + k0 * sc.DVp, sc.DVp, true);
              tile_gemm<T>(krows, sc.Dp, nq, sc.dp.data(), 1, kBK, sc.q.data(), sc.Dp, dk.data() + k0 * sc.Dp,
                           sc.Dp, true);
              tile_gemm<T>(rows, sc.Dp, nk, sc.dp.data(), kBK, 1, krow.data() + k0 * sc.Dp, sc.Dp, dq.data(),
                           sc.Dp, true);
              if (gbias) {
                for (int64_t i = 0; i < nq; ++i) {
                  T* dst = gbias + (q0 + i) * M + k0;
                  const T* ds = sc.dp.data() + i * kBK;
#pragma omp simd
                  for (int64_t j = 0; j < nk; ++j) dst[j] += ds[j];
                }
              }
            }
            store_scaled(grad_q.row(bh, q0), grad_q.sn, dq.data(), sc.Dp, nq, s.D, scale);
          }
          store_scaled(grad_v.row(bh, 0), grad_v.sn, dv.data(), sc.DVp, M, s.DV, T(1));
          store_scaled(grad_k.row(bh, 0), grad_k.sn, dk.data(), sc.Dp, M, s.D, scale);
        }
      }
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Forward

template <typename T>
void sequential_attention_forward(HeadRows<const T> q, HeadRows<const T> k, HeadRows<const T> v, BiasView<T> bias,
                                  T* out, T* lse, const AttentionShape& s) {
  const int64_t BH = s.B * s.H, nqb = (s.N + kBQ - 1) / kBQ, nkb = (s.M + kBK - 1) / kBK;
  const T scale = T(s.scale);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  // With several query blocks, k^T and v of every head are packed once ([BH][nkb][D][kBK] and [BH][M][DVp]; O(M d)
  // like k and v themselves) rather than once per query block (N = 4096: 136 -> 115 ms). With one query block per
  // head each task packs its own, as the extra pass only cost time there.
  const bool prepack = nqb > 1;
  const int64_t DVp = round_up(s.DV, kGemmNR), kt_head = nkb * s.D * kBK, v_head = s.M * DVp;
  std::vector<T> kt_all(prepack ? BH * kt_head : 0), v_all(prepack ? BH * v_head : 0);
#pragma omp parallel for collapse(2) schedule(static) if (prepack)
  for (int64_t bh = 0; bh < (prepack ? BH : 0); ++bh) {
    for (int64_t kb = 0; kb < nkb; ++kb) {
      const int64_t k0 = kb * kBK, nk = std::min(kBK, s.M - k0);
      pack_transposed(k.row(bh, k0), k.sn, nk, s.D, kt_all.data() + bh * kt_head + kb * s.D * kBK);
      pack_rows(v.row(bh, k0), v.sn, nk, s.DV, v_all.data() + bh * v_head + k0 * DVp, nk, DVp);
    }
  }
#pragma omp parallel
  {
    Scratch<T> sc(s);
    std::vector<T> m(kBQ), l(kBQ);
    // Query blocks outermost, heads innermost: consecutive tasks read the same rows of a bias shared by the heads
    // (or the batch) while they are still in cache. Head-major order read a shared [N, M] bias from memory once per
    // head; at N = M = 4096 that was half the forward's time, a 64 MiB stream per head.
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t qb = 0; qb < nqb; ++qb) {
      for (int64_t bh = 0; bh < BH; ++bh) {
        const int64_t b = bh / s.H, h = bh % s.H;
        const int64_t q0 = qb * kBQ, nq = std::min(kBQ, s.N - q0), rows = round_up(nq, kGemmMR);
        pack_rows(q.row(bh, q0), q.sn, nq, s.D, sc.q.data(), round_up(nq, kGemmMR), sc.Dp);
        T* O = sc.acc.data();  // [kBQ][DVp]
        std::fill(O, O + rows * sc.DVp, T(0));
        std::fill(m.begin(), m.end(), neg_inf);
        std::fill(l.begin(), l.end(), T(0));
        for (int64_t k0 = 0; k0 < s.M; k0 += kBK) {
          const int64_t nk = std::min(kBK, s.M - k0), w = span(nk);
          const T* kt = sc.kt.data();
          const T* vp = sc.kv.data();
          if (prepack) {
            kt = kt_all.data() + bh * kt_head + (k0 / kBK) * s.D * kBK;
            vp = v_all.data() + bh * v_head + k0 * DVp;
          } else {
            pack_transposed(k.row(bh, k0), k.sn, nk, s.D, sc.kt.data());
            pack_rows(v.row(bh, k0), v.sn, nk, s.DV, sc.kv.data(), nk, sc.DVp);
          }
          T* S = sc.p.data();
          tile_gemm<T>(rows, round_up(nk, kGemmNR), s.D, sc.q.data(), sc.Dp, 1, kt, kBK, S, kBK, false);
          for (int64_t i = 0; i < nq; ++i) {
            T* row = S + i * kBK;
            scale_and_bias(row, nk, scale, bias_row(bias, b, h, q0 + i, k0), bias.sm);
            T mx = neg_inf;
#pragma omp simd reduction(max : mx)
            for (int64_t j = 0; j < nk; ++j) mx = row[j] > mx ? row[j] : mx;
            const T m_new = mx > m[i] ? mx : m[i];
            // A row with no finite score yet keeps m = -inf; subtracting 0 instead keeps exp(-inf - m) at 0
            // rather than NaN, so that a fully masked key block does not poison the row.
            const T base = m_new == neg_inf ? T(0) : m_new;
            const T sum = exp_shifted_row(row, w, base);
            const T alpha = std::exp(m[i] - base);
            l[i] = l[i] * alpha + sum;
            m[i] = m_new;
            T* o = O + i * sc.DVp;
#pragma omp simd
            for (int64_t c = 0; c < sc.DVp; ++c) o[c] *= alpha;
          }
          for (int64_t i = nq; i < rows; ++i) std::fill(S + i * kBK, S + i * kBK + w, T(0));
          tile_gemm<T>(rows, sc.DVp, nk, S, kBK, 1, vp, sc.DVp, O, sc.DVp, true);
        }
        for (int64_t i = 0; i < nq; ++i) {
          // l = 0 only when every score is -inf: 0 * (1/0) = NaN, the NaN policy.
          const T inv = T(1) / l[i];
          T* dst = out + (bh * s.N + q0 + i) * s.DV;
          const T* o = O + i * sc.DVp;
          for (int64_t c = 0; c < s.DV; ++c) dst[c] = o[c] * inv;
          lse[bh * s.N + q0 + i] = m[i] + std::log(l[i]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward

template <typename T>
void sequential_attention_backward(HeadRows<const T> grad_out, HeadRows<const T> q, HeadRows<const T> k,
                                   HeadRows<const T> v, BiasView<T> bias, const T* out, const T* lse,
                                   HeadRows<T> grad_q, HeadRows<T> grad_k, HeadRows<T> grad_v, T* grad_bias,
                                   int64_t bias_B, int64_t bias_H, const AttentionShape& s) {
  const int64_t BH = s.B * s.H, nqb = (s.N + kBQ - 1) / kBQ, nkb = (s.M + kBK - 1) / kBK;
  const T scale = T(s.scale);
  // delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij: the softmax backward's per-row term.
  std::vector<T> delta(BH * s.N);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < BH * s.N; ++r) {
    T acc = 0;
    const T* go = grad_out.row(r / s.N, r % s.N);
    for (int64_t c = 0; c < s.DV; ++c) acc += go[c] * out[r * s.DV + c];
    delta[r] = acc;
  }

  const int64_t GB = grad_bias ? bias_B : s.B, GH = grad_bias ? bias_H : s.H;
  if (GB * GH >= 2 * omp_get_max_threads()) {
    per_head_backward(grad_out, q, k, v, bias, delta.data(), lse, grad_q, grad_k, grad_v, grad_bias, GB, GH, s);
    return;
  }

  // (A) one task per (head, key block): dK and dV of those keys, summed over every query block in order.
#pragma omp parallel
  {
    Scratch<T> sc(s);
    std::vector<T> dv_acc(kBK * sc.DVp);
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t kb = 0; kb < nkb; ++kb) {  // key blocks outermost, for the reason given in the forward
      for (int64_t bh = 0; bh < BH; ++bh) {
        const int64_t b = bh / s.H, h = bh % s.H;
        const int64_t k0 = kb * kBK, nk = std::min(kBK, s.M - k0), krows = round_up(nk, kGemmMR);
        pack_transposed(k.row(bh, k0), k.sn, nk, s.D, sc.kt.data());
        pack_transposed(v.row(bh, k0), v.sn, nk, s.DV, sc.vt.data());
        T* dK = sc.acc.data();  // [kBK][Dp]
        std::fill(dK, dK + kBK * sc.Dp, T(0));
        std::fill(dv_acc.begin(), dv_acc.end(), T(0));
        for (int64_t q0 = 0; q0 < s.N; q0 += kBQ) {
          const int64_t nq = std::min(kBQ, s.N - q0);
          pack_rows(q.row(bh, q0), q.sn, nq, s.D, sc.q.data(), round_up(nq, kGemmMR), sc.Dp);
          pack_rows(grad_out.row(bh, q0), grad_out.sn, nq, s.DV, sc.o_or_do.data(), round_up(nq, kGemmMR),
                    sc.DVp);
          prob_and_grad_tile(sc, bias, lse + bh * s.N + q0, delta.data() + bh * s.N + q0, b, h, q0, nq, k0, nk, s);
          // dV += P^T dO and dK += dS^T Q: A read transposed (row stride 1, k stride kBK)
          tile_gemm<T>(krows, sc.DVp, nq, sc.p.data(), 1, kBK, sc.o_or_do.data(), sc.DVp, dv_acc.data(), sc.DVp,
                       true);
          tile_gemm<T>(krows, sc.Dp, nq, sc.dp.data(), 1, kBK, sc.q.data(), sc.Dp, dK, sc.Dp, true);
        }
        for (int64_t j = 0; j < nk; ++j) {
          T* gk = grad_k.row(bh, k0 + j);
          T* gv = grad_v.row(bh, k0 + j);
          for (int64_t c = 0; c < s.D; ++c) gk[c] = dK[j * sc.Dp + c] * scale;
          for (int64_t c = 0; c < s.DV; ++c) gv[c] = dv_acc[j * sc.DVp + c];
        }
      }
    }
  }

  // (B) one task per (bias group, query block): dQ of those rows for every head of the group, and the group's
  // dbias rows summed over its heads in (b, h) order. Without a bias gradient a group is one head.
#pragma omp parallel
  {
    Scratch<T> sc(s);
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t g = 0; g < GB * GH; ++g) {
      for (int64_t qb = 0; qb < nqb; ++qb) {
        const int64_t gb = g / GH, gh = g % GH;
        const int64_t q0 = qb * kBQ, nq = std::min(kBQ, s.N - q0), rows = round_up(nq, kGemmMR);
        T* gbias = grad_bias ? grad_bias + (g * s.N + q0) * s.M : nullptr;  // rows [q0, q0+nq) of group g
        if (gbias) std::fill(gbias, gbias + nq * s.M, T(0));
        const int64_t b_lo = GB == s.B ? gb : 0, b_hi = GB == s.B ? gb + 1 : s.B;
        const int64_t h_lo = GH == s.H ? gh : 0, h_hi = GH == s.H ? gh + 1 : s.H;
        for (int64_t b = b_lo; b < b_hi; ++b) {
          for (int64_t h = h_lo; h < h_hi; ++h) {
            const int64_t bh = b * s.H + h;
            pack_rows(q.row(bh, q0), q.sn, nq, s.D, sc.q.data(), round_up(nq, kGemmMR), sc.Dp);
            pack_rows(grad_out.row(bh, q0), grad_out.sn, nq, s.DV, sc.o_or_do.data(), round_up(nq, kGemmMR),
                    sc.DVp);
            T* dQ = sc.acc.data();  // [kBQ][Dp]
            std::fill(dQ, dQ + kBQ * sc.Dp, T(0));
            for (int64_t k0 = 0; k0 < s.M; k0 += kBK) {
              const int64_t nk = std::min(kBK, s.M - k0);
              const T* kblk = k.row(bh, k0);
              pack_transposed(kblk, k.sn, nk, s.D, sc.kt.data());
              pack_transposed(v.row(bh, k0), v.sn, nk, s.DV, sc.vt.data());
              pack_rows(kblk, k.sn, nk, s.D, sc.kv.data(), nk, sc.Dp);
              prob_and_grad_tile(sc, bias, lse + bh * s.N + q0, delta.data() + bh * s.N + q0, b, h, q0, nq, k0,
                                 nk, s);
              tile_gemm<T>(rows, sc.Dp, nk, sc.dp.data(), kBK, 1, sc.kv.data(), sc.Dp, dQ, sc.Dp, true);
              if (gbias) {
                for (int64_t i = 0; i < nq; ++i) {
                  T* dst = gbias + i * s.M + k0;
                  const T* ds = sc.dp.data() + i * kBK;
#pragma omp simd
                  for (int64_t j = 0; j < nk; ++j) dst[j] += ds[j];
                }
              }
            }
            for (int64_t i = 0; i < nq; ++i) {
              T* gq = grad_q.row(bh, q0 + i);
              for (int64_t c = 0; c < s.D; ++c) gq[c] = dQ[i * sc.Dp + c] * scale;
            }
          }
        }
      }
    }
  }
}

#define PYVL_INSTANTIATE(T)                                                                                        \
  template void sequential_attention_forward<T>(HeadRows<const T>, HeadRows<const T>, HeadRows<const T>,          \
                                                BiasView<T>, T*, T*, const AttentionShape&);                       \
  template void sequential_attention_backward<T>(HeadRows<const T>, HeadRows<const T>, HeadRows<const T>,         \
                                                 HeadRows<const T>, BiasView<T>, const T*, const T*, HeadRows<T>, \
                                                 HeadRows<T>, HeadRows<T>, T*, int64_t, int64_t, const AttentionShape&);
PYVL_INSTANTIATE(float)
PYVL_INSTANTIATE(double)
#undef PYVL_INSTANTIATE

}  // namespace cpu
}  // namespace pyvl
