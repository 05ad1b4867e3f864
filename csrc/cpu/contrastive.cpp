#include "cpu/contrastive.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "cpu/similarity.h"

namespace pyvl {
namespace cpu {
namespace {

// exp for float without a libm call, so that the epilogue loops vectorize (AVX2: 8 lanes): Cody-Waite range
// reduction x = k ln2 + r, |r| <= ln2 / 2, Cephes' degree-6 polynomial for exp(r) (about 1 ulp), 2^k from the
// exponent bits. Arguments are clamped to [-87, 88], inside float's normal range: the kernels only take exp of
// logits minus their running maximum (<= 0), where exp(-87) ~ 1.6e-38 is as good as 0 beside the 1 of the
// maximum. NaN passes through (both comparisons are false).
inline float exp_fast(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits
  const float t = x * 1.44269504088896341f + magic;
  const float k = t - magic;
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  uint32_t tb, mb;
  std::memcpy(&tb, &t, 4);
  std::memcpy(&mb, &magic, 4);
  const uint32_t bits = (tb - mb + 127u) << 23;
  float pow2;
  std::memcpy(&pow2, &bits, 4);
  return e * pow2;
}

inline double exp_fast(double x) { return std::exp(x); }

template <typename T>
inline T softplus(T x) {
  return (x > T(0) ? x : T(0)) + std::log1p(exp_fast(-std::fabs(x)));
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + exp_fast(-x));
}

constexpr int64_t BS = kSimBlock;

}  // namespace

template <typename T>
void contrastive_stats_forward(const T* x, const T* y, int64_t n, int64_t m, int64_t d, T scale, T bias,
                               ContrastiveKind kind, int64_t diag_offset, T* row, T* col, T* diag) {
  const bool softmax = kind == ContrastiveKind::Softmax;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) diag[i] = T(0);  // pairs whose column is outside the block
  if (n == 0 || m == 0) {
    for (int64_t i = 0; i < n; ++i) row[i] = softmax ? neg_inf : T(0);
    if (softmax)
      for (int64_t j = 0; j < m; ++j) col[j] = neg_inf;
    return;
  }
  const int64_t row_blocks = (n + BS - 1) / BS;
  const int64_t col_blocks = (m + BS - 1) / BS;
  const int nt = omp_get_max_threads();
  // Each thread owns whole column blocks: it packs its block of y once (no packed copy of all of y), completes
  // those columns' statistics over every row block, and keeps a running (max, sum) of every row's statistic over
  // its columns, merged at the end: O(threads * n) besides the tiles, no n x m anywhere.
  std::vector<T> rmax_all(static_cast<size_t>(nt * n), neg_inf);
  std::vector<double> rsum_all(static_cast<size_t>(nt * n), 0.0);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    std::vector<T> tile(BS * BS + kSimNR);
    std::vector<T> scratch(kSimMR * d);
    std::vector<T> panel(BS * d);
    T cmax[BS], tmax[BS], cs[BS];
    double csum[BS];
    T* my_rmax = rmax_all.data() + t * n;
    double* my_rsum = rsum_all.data() + t * n;
#pragma omp for schedule(dynamic, 1)
    for (int64_t jb = 0; jb < col_blocks; ++jb) {
      const int64_t j0 = jb * BS;
      const int64_t cols = std::min(BS, m - j0);
      pack_panels<T>(y + j0 * d, cols, d, d, panel.data());
      for (int64_t j = 0; j < cols; ++j) {
        cmax[j] = neg_inf;
        csum[j] = 0.0;
      }
      for (int64_t ib = 0; ib < row_blocks; ++ib) {
        const int64_t i0 = ib * BS;
        const int64_t rows = std::min(BS, n - i0);
        dot_tile<T>(x + i0 * d, d, rows, panel.data(), d, 0, cols, tile.data(), scratch.data());
        for (int64_t i = 0; i < rows; ++i) {
          T* L = tile.data() + i * BS;
          for (int64_t j = 0; j < cols; ++j) L[j] = scale * L[j] + bias;
          const int64_t jd = i0 + i + diag_offset - j0;  // this row's matched column, if it is in the tile
          if (jd >= 0 && jd < cols) diag[i0 + i] = L[jd];
        }
        if (!softmax) {
          for (int64_t i = 0; i < rows; ++i) {
            const T* L = tile.data() + i * BS;
            T s = 0;
            for (int64_t j = 0; j < cols; ++j) s += softplus(L[j]);
            my_rsum[i0 + i] += s;
          }
          continue;
        }
        for (int64_t i = 0; i < rows; ++i) {
          const T* L = tile.data() + i * BS;
          T tm = neg_inf;
          for (int64_t j = 0; j < cols; ++j) tm = L[j] > tm ? L[j] : tm;
          const T old = my_rmax[i0 + i];
          const T nm = tm > old ? tm : old;
          T s = 0;
          for (int64_t j = 0; j < cols; ++j) s += exp_fast(L[j] - nm);
          my_rsum[i0 + i] = my_rsum[i0 + i] * exp_fast(old - nm) + s;
          my_rmax[i0 + i] = nm;
        }
        for (int64_t j = 0; j < cols; ++j) {
          tmax[j] = cmax[j];
          cs[j] = 0;
        }
        for (int64_t i = 0; i < rows; ++i) {
          const T* L = tile.data() + i * BS;
          for (int64_t j = 0; j < cols; ++j) tmax[j] = L[j] > tmax[j] ? L[j] : tmax[j];
        }
        for (int64_t i = 0; i < rows; ++i) {
          const T* L = tile.data() + i * BS;
          for (int64_t j = 0; j < cols; ++j) cs[j] += exp_fast(L[j] - tmax[j]);
        }
        for (int64_t j = 0; j < cols; ++j) {
          csum[j] = csum[j] * exp_fast(cmax[j] - tmax[j]) + cs[j];
          cmax[j] = tmax[j];
        }
      }
      if (softmax)
        for (int64_t j = 0; j < cols; ++j) col[j0 + j] = T(cmax[j] + std::log(csum[j]));
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    if (!softmax) {
      double s = 0;
      for (int t = 0; t < nt; ++t) s += rsum_all[t * n + i];
      row[i] = T(s);
      continue;
    }
    T mx = neg_inf;
    for (int t = 0; t < nt; ++t) mx = std::max(mx, rmax_all[t * n + i]);
    double s = 0;
    for (int t = 0; t < nt; ++t)
      if (rsum_all[t * n + i] != 0.0) s += rsum_all[t * n + i] * std::exp(double(rmax_all[t * n + i]) - double(mx));
    row[i] = T(mx + std::log(s));
  }
}

template <typename T>
void contrastive_stats_backward(const T* x, const T* y, int64_t n, int64_t m, int64_t d, T scale, T bias,
                                ContrastiveKind kind, int64_t diag_offset, const T* row, const T* col,
                                const T* grad_row, const T* grad_col, const T* grad_diag, T* grad_x, T* grad_y,
                                double* grad_scale, double* grad_bias) {
  const bool softmax = kind == ContrastiveKind::Softmax;
  if (grad_x) std::fill(grad_x, grad_x + n * d, T(0));
  if (grad_y) std::fill(grad_y, grad_y + m * d, T(0));
  double gs_total = 0, gb_total = 0;
  if (n > 0 && m > 0) {
    const int64_t row_blocks = (n + BS - 1) / BS;
    const int64_t col_blocks = (m + BS - 1) / BS;
    // Each thread owns whole column blocks (so grad_y needs no synchronization) and visits every row block,
    // thread t starting at row block t * row_blocks / threads, so two threads rarely want the same grad_x rows at
    // once; a lock per row block serializes the rare collision. Memory: the tiles, not n x m nor threads x n x d.
    std::unique_ptr<std::mutex[]> locks(new std::mutex[row_blocks]);
#pragma omp parallel
    {
      std::vector<T> tile(BS * BS + kSimNR);
      std::vector<T> G(BS * BS + kSimNR, T(0));
      std::vector<T> scratch(kSimMR * d);
      std::vector<T> panel(BS * d);  // this thread's column block of y, packed once per block
      double gs = 0, gb = 0;
      const int64_t start = omp_get_thread_num() * row_blocks / omp_get_num_threads();
#pragma omp for schedule(dynamic, 1)
      for (int64_t jb = 0; jb < col_blocks; ++jb) {
        const int64_t j0 = jb * BS;
        const int64_t cols = std::min(BS, m - j0);
        pack_panels<T>(y + j0 * d, cols, d, d, panel.data());
        for (int64_t step = 0; step < row_blocks; ++step) {
          const int64_t ib = (step + start) % row_blocks;
          const int64_t i0 = ib * BS;
          const int64_t rows = std::min(BS, n - i0);
          dot_tile<T>(x + i0 * d, d, rows, panel.data(), d, 0, cols, tile.data(), scratch.data());
          for (int64_t i = 0; i < BS; ++i) {
            T* g = G.data() + i * BS;
            if (i >= rows) {
              std::fill(g, g + BS, T(0));
              continue;
            }
            const T* S = tile.data() + i * BS;
            const T a = grad_row[i0 + i];
            T sum_gs = 0, sum_g = 0;
            if (softmax) {
              const T r = row[i0 + i];
              const T* c = col + j0;
              const T* gc = grad_col + j0;
              for (int64_t j = 0; j < cols; ++j) {
                const T L = scale * S[j] + bias;
                const T v = a * exp_fast(L - r) + gc[j] * exp_fast(L - c[j]);
                sum_gs += v * S[j];
                sum_g += v;
                g[j] = v * scale;
              }
            } else {
              for (int64_t j = 0; j < cols; ++j) {
                const T v = a * sigmoid(scale * S[j] + bias);
                sum_gs += v * S[j];
                sum_g += v;
                g[j] = v * scale;
              }
            }
            std::fill(g + cols, g + BS, T(0));
            const int64_t jd = i0 + i + diag_offset - j0;  // the matched pair's logit: its own cotangent
            if (jd >= 0 && jd < cols) {
              const T v = grad_diag[i0 + i];
              sum_gs += v * S[jd];
              sum_g += v;
              g[jd] += v * scale;
            }
            gs += sum_gs;
            gb += sum_g;
          }
          if (grad_y)  // grad_y[j0 + j] += sum_i G[i, j] x[i0 + i]: A = G^T
            gemm_accumulate<T>(cols, rows, G.data(), 1, BS, x + i0 * d, d, d, T(1), grad_y + j0 * d, d);
          if (grad_x) {  // grad_x[i0 + i] += sum_j G[i, j] y[j0 + j]
            std::lock_guard<std::mutex> guard(locks[ib]);
            gemm_accumulate<T>(rows, cols, G.data(), BS, 1, y + j0 * d, d, d, T(1), grad_x + i0 * d, d);
          }
        }
      }
#pragma omp critical
      {
        gs_total += gs;
        gb_total += gb;
      }
    }
  }
  if (grad_scale) *grad_scale = gs_total;
  if (grad_bias) *grad_bias = gb_total;
}

template void contrastive_stats_forward<float>(const float*, const float*, int64_t, int64_t, int64_t, float, float,
                                               ContrastiveKind, int64_t, float*, float*, float*);
template void contrastive_stats_forward<double>(const double*, const double*, int64_t, int64_t, int64_t, double,
                                                double, ContrastiveKind, int64_t, double*, double*, double*);
template void contrastive_stats_backward<float>(const float*, const float*, int64_t, int64_t, int64_t, float, float,
                                                ContrastiveKind, int64_t, const float*, const float*, const float*,
                                                const float*, const float*, float*, float*, double*, double*);
template void contrastive_stats_backward<double>(const double*, const double*, int64_t, int64_t, int64_t, double,
                                                 double, ContrastiveKind, int64_t, const double*, const double*,
                                                 const double*, const double*, const double*, double*, double*,
                                                 double*, double*);

}  // namespace cpu
}  // namespace pyvl
