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
// Tiles are zero-padded to the micro-kernel's 6 x 16 grid, so partial blocks need no separate code path.
#include "cpu/sequential_attention.h"

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

// ---------------------------------------------------------------------------------------------------------------
// exp over a row. float: simd::exp8 (Cephes' expf, Cody-Waite reduction, about 1 ulp) on 8 lanes; glibc
// only vectorizes exp under -ffast-math, which would also break the NaN policy. exp(-inf) = 0 and NaN stays NaN.

template <typename T>
inline void exp_row(T* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j]);
}

#if defined(__AVX2__) && defined(__FMA__)

template <>
inline void exp_row<float>(float* x, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, simd::exp8(_mm256_loadu_ps(x + j)));
  for (; j < n; ++j) x[j] = std::exp(x[j]);
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

// dst[cols][kBK] = the transpose of src rows [0, rows) (row stride src_ld, `cols` columns), zero-padded to kBK.
template <typename T>
void pack_transposed(const T* src, int64_t src_ld, int64_t rows, int64_t cols, T* dst) {
  for (int64_t c = 0; c < cols; ++c) {
    T* d = dst + c * kBK;
    for (int64_t r = 0; r < rows; ++r) d[r] = src[r * src_ld + c];
    for (int64_t r = rows; r < kBK; ++r) d[r] = T(0);
  }
}

// row[j] = scale * row[j] + bias[j * sm] for j < nk (bias may be null), -inf for nk <= j < kBK.
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
  for (int64_t j = nk; j < kBK; ++j) row[j] = -std::numeric_limits<T>::infinity();
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
// dO (sc.o_or_do), k^T (sc.kt) and v^T (sc.vt): P = exp(scale * q k^T + bias - lse), dS = P * (dO v^T - delta).
// Entries outside the tile are 0 in both.
template <typename T>
void prob_and_grad_tile(Scratch<T>& sc, const BiasView<T>& bias, const T* lse, const T* delta, int64_t b, int64_t h,
                        int64_t q0, int64_t nq, int64_t k0, int64_t nk, const AttentionShape& s) {
  const T scale = T(s.scale);
  const int64_t rows = round_up(nq, kGemmMR), cols = round_up(nk, kGemmNR);
  T* P = sc.p.data();
  T* dS = sc.dp.data();
  tile_gemm<T>(rows, cols, s.D, sc.q.data(), sc.Dp, 1, sc.kt.data(), kBK, P, kBK, false);
  tile_gemm<T>(rows, cols, s.DV, sc.o_or_do.data(), sc.DVp, 1, sc.vt.data(), kBK, dS, kBK, false);
  for (int64_t i = 0; i < nq; ++i) {
    T* p = P + i * kBK;
    T* ds = dS + i * kBK;
    scale_and_bias(p, nk, scale, bias_row(bias, b, h, q0 + i, k0), bias.sm);
    const T m = lse[i];
#pragma omp simd
    for (int64_t j = 0; j < kBK; ++j) p[j] -= m;
    exp_row(p, kBK);
    const T d = delta[i];
#pragma omp simd
    for (int64_t j = 0; j < kBK; ++j) ds[j] = j < nk ? p[j] * (ds[j] - d) : T(0);
  }
  for (int64_t i = nq; i < kBQ; ++i)
    for (int64_t j = 0; j < kBK; ++j) P[i * kBK + j] = dS[i * kBK + j] = T(0);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Forward

template <typename T>
void sequential_attention_forward(const T* q, const T* k, const T* v, BiasView<T> bias, T* out, T* lse,
                                  const AttentionShape& s) {
  const int64_t BH = s.B * s.H, nqb = (s.N + kBQ - 1) / kBQ;
  const T scale = T(s.scale);
  const T neg_inf = -std::numeric_limits<T>::infinity();
#pragma omp parallel
  {
    Scratch<T> sc(s);
    std::vector<T> m(kBQ), l(kBQ);
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t bh = 0; bh < BH; ++bh) {
      for (int64_t qb = 0; qb < nqb; ++qb) {
        const int64_t b = bh / s.H, h = bh % s.H;
        const int64_t q0 = qb * kBQ, nq = std::min(kBQ, s.N - q0), rows = round_up(nq, kGemmMR);
        const T* qh = q + bh * s.N * s.D;
        const T* kh = k + bh * s.M * s.D;
        const T* vh = v + bh * s.M * s.DV;
        pack_rows(qh + q0 * s.D, s.D, nq, s.D, sc.q.data(), kBQ, sc.Dp);
        T* O = sc.acc.data();  // [kBQ][DVp]
        std::fill(O, O + kBQ * sc.DVp, T(0));
        std::fill(m.begin(), m.end(), neg_inf);
        std::fill(l.begin(), l.end(), T(0));
        for (int64_t k0 = 0; k0 < s.M; k0 += kBK) {
          const int64_t nk = std::min(kBK, s.M - k0);
          pack_transposed(kh + k0 * s.D, s.D, nk, s.D, sc.kt.data());
          pack_rows(vh + k0 * s.DV, s.DV, nk, s.DV, sc.kv.data(), kBK, sc.DVp);
          T* S = sc.p.data();
          tile_gemm<T>(rows, round_up(nk, kGemmNR), s.D, sc.q.data(), sc.Dp, 1, sc.kt.data(), kBK, S, kBK, false);
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
#pragma omp simd
            for (int64_t j = 0; j < kBK; ++j) row[j] -= base;
            exp_row(row, kBK);
            T sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < kBK; ++j) sum += row[j];
            const T alpha = std::exp(m[i] - base);
            l[i] = l[i] * alpha + sum;
            m[i] = m_new;
            T* o = O + i * sc.DVp;
#pragma omp simd
            for (int64_t c = 0; c < sc.DVp; ++c) o[c] *= alpha;
          }
          for (int64_t i = nq; i < rows; ++i) std::fill(S + i * kBK, S + (i + 1) * kBK, T(0));
          tile_gemm<T>(rows, sc.DVp, nk, S, kBK, 1, sc.kv.data(), sc.DVp, O, sc.DVp, true);
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
void sequential_attention_backward(const T* grad_out, const T* q, const T* k, const T* v, BiasView<T> bias,
                                   const T* out, const T* lse, T* grad_q, T* grad_k, T* grad_v, T* grad_bias,
                                   int64_t bias_B, int64_t bias_H, const AttentionShape& s) {
  const int64_t BH = s.B * s.H, nqb = (s.N + kBQ - 1) / kBQ, nkb = (s.M + kBK - 1) / kBK;
  const T scale = T(s.scale);
  // delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij: the softmax backward's per-row term.
  std::vector<T> delta(BH * s.N);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < BH * s.N; ++r) {
    T acc = 0;
    for (int64_t c = 0; c < s.DV; ++c) acc += grad_out[r * s.DV + c] * out[r * s.DV + c];
    delta[r] = acc;
  }

  // (A) one task per (head, key block): dK and dV of those keys, summed over every query block in order.
#pragma omp parallel
  {
    Scratch<T> sc(s);
    std::vector<T> dv_acc(kBK * sc.DVp);
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t bh = 0; bh < BH; ++bh) {
      for (int64_t kb = 0; kb < nkb; ++kb) {
        const int64_t b = bh / s.H, h = bh % s.H;
        const int64_t k0 = kb * kBK, nk = std::min(kBK, s.M - k0), krows = round_up(nk, kGemmMR);
        pack_transposed(k + (bh * s.M + k0) * s.D, s.D, nk, s.D, sc.kt.data());
        pack_transposed(v + (bh * s.M + k0) * s.DV, s.DV, nk, s.DV, sc.vt.data());
        T* dK = sc.acc.data();  // [kBK][Dp]
        std::fill(dK, dK + kBK * sc.Dp, T(0));
        std::fill(dv_acc.begin(), dv_acc.end(), T(0));
        for (int64_t q0 = 0; q0 < s.N; q0 += kBQ) {
          const int64_t nq = std::min(kBQ, s.N - q0);
          pack_rows(q + (bh * s.N + q0) * s.D, s.D, nq, s.D, sc.q.data(), kBQ, sc.Dp);
          pack_rows(grad_out + (bh * s.N + q0) * s.DV, s.DV, nq, s.DV, sc.o_or_do.data(), kBQ, sc.DVp);
          prob_and_grad_tile(sc, bias, lse + bh * s.N + q0, delta.data() + bh * s.N + q0, b, h, q0, nq, k0, nk, s);
          // dV += P^T dO and dK += dS^T Q: A read transposed (row stride 1, k stride kBK)
          tile_gemm<T>(krows, sc.DVp, nq, sc.p.data(), 1, kBK, sc.o_or_do.data(), sc.DVp, dv_acc.data(), sc.DVp,
                       true);
          tile_gemm<T>(krows, sc.Dp, nq, sc.dp.data(), 1, kBK, sc.q.data(), sc.Dp, dK, sc.Dp, true);
        }
        for (int64_t j = 0; j < nk; ++j) {
          T* gk = grad_k + (bh * s.M + k0 + j) * s.D;
          T* gv = grad_v + (bh * s.M + k0 + j) * s.DV;
          for (int64_t c = 0; c < s.D; ++c) gk[c] = dK[j * sc.Dp + c] * scale;
          for (int64_t c = 0; c < s.DV; ++c) gv[c] = dv_acc[j * sc.DVp + c];
        }
      }
    }
  }

  // (B) one task per (bias group, query block): dQ of those rows for every head of the group, and the group's
  // dbias rows summed over its heads in (b, h) order. Without a bias gradient a group is one head.
  const int64_t GB = grad_bias ? bias_B : s.B, GH = grad_bias ? bias_H : s.H;
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
            pack_rows(q + (bh * s.N + q0) * s.D, s.D, nq, s.D, sc.q.data(), kBQ, sc.Dp);
            pack_rows(grad_out + (bh * s.N + q0) * s.DV, s.DV, nq, s.DV, sc.o_or_do.data(), kBQ, sc.DVp);
            T* dQ = sc.acc.data();  // [kBQ][Dp]
            std::fill(dQ, dQ + kBQ * sc.Dp, T(0));
            for (int64_t k0 = 0; k0 < s.M; k0 += kBK) {
              const int64_t nk = std::min(kBK, s.M - k0);
              const T* kblk = k + (bh * s.M + k0) * s.D;
              pack_transposed(kblk, s.D, nk, s.D, sc.kt.data());
              pack_transposed(v + (bh * s.M + k0) * s.DV, s.DV, nk, s.DV, sc.vt.data());
              pack_rows(kblk, s.D, nk, s.D, sc.kv.data(), kBK, sc.Dp);
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
              T* gq = grad_q + (bh * s.N + q0 + i) * s.D;
              for (int64_t c = 0; c < s.D; ++c) gq[c] = dQ[i * sc.Dp + c] * scale;
            }
          }
        }
      }
    }
  }
}

#define PYVL_INSTANTIATE(T)                                                                                        \
  template void sequential_attention_forward<T>(const T*, const T*, const T*, BiasView<T>, T*, T*,                 \
                                                const AttentionShape&);                                            \
  template void sequential_attention_backward<T>(const T*, const T*, const T*, const T*, BiasView<T>, const T*,   \
                                                 const T*, T*, T*, T*, T*, int64_t, int64_t, const AttentionShape&);
PYVL_INSTANTIATE(float)
PYVL_INSTANTIATE(double)
#undef PYVL_INSTANTIATE

}  // namespace cpu
}  // namespace pyvl
