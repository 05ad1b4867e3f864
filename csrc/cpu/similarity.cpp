#include "cpu/similarity.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace pyvl {
namespace cpu {
namespace {

template <typename T>
void inverse_norms(const T* x, int64_t rows, int64_t d, bool normalize, double eps, T* inv) {
  for (int64_t i = 0; i < rows; ++i) {
    if (!normalize) {
      inv[i] = T(1);
      continue;
    }
    // Eight independent partial sums: one chain would serialize on the add latency (the compiler keeps the order
    // of a double sum), eight vectorize.
    constexpr int64_t L = 8;
    double part[L] = {};
    const T* r = x + i * d;
    int64_t k = 0;
    for (; k + L <= d; k += L)
      for (int64_t l = 0; l < L; ++l) part[l] += double(r[k + l]) * double(r[k + l]);
    for (; k < d; ++k) part[k % L] += double(r[k]) * double(r[k]);
    double s = 0;
    for (int64_t l = 0; l < L; ++l) s += part[l];
    inv[i] = T(1.0 / std::max(std::sqrt(s), eps));
  }
}

}  // namespace

template <typename T>
void similarity_logits_forward(const T* a, const T* b, T* out, int64_t B, int64_t N, int64_t M, int64_t d,
                               int64_t a_bs, int64_t b_bs, T scale, T bias, bool normalize, double eps) {
  if (B == 0 || N == 0 || M == 0) return;
  // A broadcast b against a dense batch of a is one [B*N, d] x [M, d]^T problem: its row blocks then span batches,
  // so N = 100 (CoOp's classes) makes no 4-row remainder block per batch.
  if (B > 1 && b_bs == 0 && a_bs == N * d) {
    N *= B;
    B = 1;
  }
  // b is packed (and its norms taken) once per distinct batch: once in all when it is broadcast.
  const int64_t nb = b_bs == 0 ? 1 : B;
  const int64_t Mp = round_up(M, kSimNR);
  std::vector<T> panels(static_cast<size_t>(nb * Mp * d));
  std::vector<T> inv_b(static_cast<size_t>(nb * M));
  for (int64_t bi = 0; bi < nb; ++bi) {
    pack_panels<T>(b + bi * b_bs, M, d, d, panels.data() + bi * Mp * d);
    inverse_norms<T>(b + bi * b_bs, M, d, normalize, eps, inv_b.data() + bi * M);
  }
  const int64_t row_blocks = (N + kSimBlock - 1) / kSimBlock;
  const int64_t col_blocks = (M + kSimBlock - 1) / kSimBlock;
#pragma omp parallel
  {
    std::vector<T> tile(kSimBlock * kSimBlock + kSimNR);
    std::vector<T> scratch(kSimMR * d);
    T inv_a[kSimBlock];
#pragma omp for schedule(dynamic, 1)
    for (int64_t job = 0; job < B * row_blocks; ++job) {
      const int64_t bi = job / row_blocks;
      const int64_t i0 = job % row_blocks * kSimBlock;
      const int64_t rows = std::min(kSimBlock, N - i0);
      const T* ab = a + bi * a_bs + i0 * d;
      const T* pan = panels.data() + (b_bs == 0 ? 0 : bi) * Mp * d;
      const T* ib = inv_b.data() + (b_bs == 0 ? 0 : bi) * M;
      inverse_norms<T>(ab, rows, d, normalize, eps, inv_a);
      for (int64_t jb = 0; jb < col_blocks; ++jb) {
        const int64_t j0 = jb * kSimBlock;
        const int64_t cols = std::min(kSimBlock, M - j0);
        dot_tile<T>(ab, d, rows, pan, d, j0, cols, tile.data(), scratch.data());
        for (int64_t i = 0; i < rows; ++i) {
          const T si = scale * inv_a[i];
          const T* t = tile.data() + i * kSimBlock;
          T* o = out + (bi * N + i0 + i) * M + j0;
          for (int64_t j = 0; j < cols; ++j) o[j] = t[j] * si * ib[j0 + j] + bias;
        }
      }
    }
  }
}

template void similarity_logits_forward<float>(const float*, const float*, float*, int64_t, int64_t, int64_t,
                                               int64_t, int64_t, int64_t, float, float, bool, double);
template void similarity_logits_forward<double>(const double*, const double*, double*, int64_t, int64_t, int64_t,
                                                int64_t, int64_t, int64_t, double, double, bool, double);

}  // namespace cpu
}  // namespace pyvl
