#include "cpu/shortest_paths.h"

#include <algorithm>
#include <vector>

namespace pyvl {
namespace cpu {

namespace {

// Out-neighbours of every node of every graph in increasing index order (CSR over the B * N rows), so that a BFS
// touches O(E) entries instead of scanning dense rows of N.
struct Csr {
  std::vector<int64_t> offsets;  // [B * N + 1]
  std::vector<int32_t> targets;
};

Csr build_csr(const bool* adj, int64_t B, int64_t N) {
  const int64_t rows = B * N;
  Csr csr;
  csr.offsets.assign(rows + 1, 0);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const bool* row = adj + r * N;
    int64_t count = 0;
    for (int64_t j = 0; j < N; ++j) count += row[j] ? 1 : 0;
    csr.offsets[r + 1] = count;
  }
  for (int64_t r = 0; r < rows; ++r) csr.offsets[r + 1] += csr.offsets[r];
  csr.targets.resize(static_cast<size_t>(csr.offsets[rows]));
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const bool* row = adj + r * N;
    int32_t* out = csr.targets.data() + csr.offsets[r];
    for (int64_t j = 0; j < N; ++j)
      if (row[j]) *out++ = static_cast<int32_t>(j);
  }
  return csr;
}

}  // namespace

void shortest_paths(const bool* adj, int64_t B, int64_t N, int64_t* dist, int64_t* path) {
  if (B <= 0 || N <= 0) return;
  const Csr csr = build_csr(adj, B, N);
#pragma omp parallel
  {
    std::vector<int32_t> queue(static_cast<size_t>(N));
#pragma omp for schedule(dynamic, 8)
    for (int64_t src = 0; src < B * N; ++src) {
      const int64_t b = src / N, s = src % N;
      int64_t* d = dist + src * N;
      int64_t* m = path + src * N;
      std::fill(d, d + N, kUnreachable);  // kUnreachable also marks "not reached yet": BFS never assigns it
      std::fill(m, m + N, kUnreachable);
      d[s] = 0;
      m[s] = -1;
      const int64_t* offsets = csr.offsets.data() + b * N;
      queue[0] = static_cast<int32_t>(s);
      int64_t head = 0, tail = 1;
      while (head < tail) {
        const int64_t u = queue[head++];
        const int64_t du = d[u];
        if (du + 1 >= kUnreachable) break;  // BFS order: every later node is at least as far
        // The label u hands to its children: the largest intermediate node of the path through u.
        const int64_t label = u == s ? -1 : std::max(m[u], u);
        for (int64_t e = offsets[u]; e < offsets[u + 1]; ++e) {
          const int64_t v = csr.targets[e];
          if (d[v] == kUnreachable) {
            d[v] = du + 1;
            m[v] = label;
            queue[tail++] = static_cast<int32_t>(v);
          } else if (d[v] == du + 1 && label < m[v]) {
            m[v] = label;  // all parents (layer du) are dequeued before v is, so m[v] is final when v is used
          }
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace pyvl
