#include "cpu/message_passing.h"

#include <cstddef>
#include <vector>

namespace pyvl {
namespace cpu {

template <typename T>
int64_t gather_scatter_add(const T* x, int64_t x_row_stride, int64_t n_in, const T* edge, int64_t edge_row_stride,
                           const int64_t* src, const int64_t* dst, int64_t num_edges, int64_t n_out, int64_t d,
                           T* out) {
  // CSR by destination: row_start[i] .. row_start[i + 1] index `order`, the edges into i in input order.
  std::vector<int64_t> row_start(static_cast<size_t>(n_out) + 1, 0);
  for (int64_t e = 0; e < num_edges; ++e) {
    const int64_t s = src[e], t = dst[e];
    if (s < 0 || s >= n_in || t < 0 || t >= n_out) return e;
    ++row_start[t + 1];
  }
  for (int64_t i = 0; i < n_out; ++i) row_start[i + 1] += row_start[i];
  std::vector<int64_t> order(static_cast<size_t>(num_edges));
  {
    std::vector<int64_t> next(row_start.begin(), row_start.end() - 1);
    for (int64_t e = 0; e < num_edges; ++e) order[next[dst[e]]++] = e;
  }
  // Molecule batches have a few edges per row; dynamic chunks of rows even out the high-degree ones. Small
  // problems stay on one thread, where waking the team costs more than the work.
  const bool parallel = num_edges * d >= (int64_t(1) << 15);
#pragma omp parallel for schedule(dynamic, 32) if (parallel)
  for (int64_t i = 0; i < n_out; ++i) {
    T* o = out + i * d;
    for (int64_t j = 0; j < d; ++j) o[j] = T(0);
    for (int64_t k = row_start[i]; k < row_start[i + 1]; ++k) {
      const int64_t e = order[k];
      const T* xs = x + src[e] * x_row_stride;
      if (edge != nullptr) {
        const T* es = edge + e * edge_row_stride;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) o[j] += xs[j] + es[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) o[j] += xs[j];
      }
    }
  }
  return -1;
}

template int64_t gather_scatter_add<float>(const float*, int64_t, int64_t, const float*, int64_t, const int64_t*,
                                           const int64_t*, int64_t, int64_t, int64_t, float*);
template int64_t gather_scatter_add<double>(const double*, int64_t, int64_t, const double*, int64_t, const int64_t*,
                                            const int64_t*, int64_t, int64_t, int64_t, double*);

}  // namespace cpu
}  // namespace pyvl
