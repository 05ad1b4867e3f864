#include "cpu/shortest_paths.h"

#include <omp.h>

#include <algorithm>
#include <vector>

namespace pyvl {
namespace cpu {

namespace {

// Out-neighbours of each node of one graph in increasing index order (CSR), so that a BFS touches O(E) entries
// instead of scanning dense rows of N.
struct Csr {
  std::vector<int64_t> offsets;  // [N + 1]
  std::vector<int32_t> targets;
};

void build_csr(const bool* adj, int64_t N, Csr& csr) {
  csr.offsets.assign(N + 1, 0);
  csr.targets.clear();
  for (int64_t i = 0; i < N; ++i) {
    const bool* row = adj + i * N;
    for (int64_t j = 0; j < N; ++j)
      if (row[j]) csr.targets.push_back(static_cast<int32_t>(j));
    csr.offsets[i + 1] = static_cast<int64_t>(csr.targets.size());
  }
}

// One source's row of dist and path; queue has room for N nodes.
void bfs(const Csr& csr, int64_t N, int64_t s, int64_t* d, int64_t* m, int32_t* queue) {
  std::fill(d, d + N, kUnreachable);  // kUnreachable also marks "not reached yet": BFS never assigns it
  std::fill(m, m + N, kUnreachable);
  d[s] = 0;
  m[s] = -1;
  queue[0] = static_cast<int32_t>(s);
  int64_t head = 0, tail = 1;
  while (head < tail) {
    const int64_t u = queue[head++];
    const int64_t du = d[u];
    if (du + 1 >= kUnreachable) break;  // BFS order: every later node is at least as far
    // The label u hands to its children: the largest intermediate node of the best path through u.
    const int64_t label = u == s ? -1 : std::max(m[u], u);
    for (int64_t e = csr.offsets[u]; e < csr.offsets[u + 1]; ++e) {
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

}  // namespace

void shortest_paths(const bool* adj, int64_t B, int64_t N, int64_t* dist, int64_t* path) {
  if (B <= 0 || N <= 0) return;
  // Below ~32k output entries the work is microseconds: threads would cost more than they save (and on a loaded
  // machine a parallel region's barrier waits for descheduled threads).
  const bool threaded = B * N * N >= (int64_t{1} << 15);
  const int64_t threads = threaded ? omp_get_max_threads() : 1;
  if (B >= 2 * threads) {
    // Many graphs (a batch of molecules): one thread takes a whole graph, with its own CSR and queue.
#pragma omp parallel if (threaded)
    {
      Csr csr;
      std::vector<int32_t> queue(static_cast<size_t>(N));
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < B; ++b) {
        build_csr(adj + b * N * N, N, csr);
        for (int64_t s = 0; s < N; ++s) {
          const int64_t row = (b * N + s) * N;
          bfs(csr, N, s, dist + row, path + row, queue.data());
        }
      }
    }
    return;
  }
  // Few large graphs: the CSRs first, then the sources of all graphs in parallel.
  std::vector<Csr> csrs(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) build_csr(adj + b * N * N, N, csrs[b]);
#pragma omp parallel if (threaded)
  {
    std::vector<int32_t> queue(static_cast<size_t>(N));
#pragma omp for schedule(dynamic, 4)
    for (int64_t src = 0; src < B * N; ++src) {
      const int64_t b = src / N, s = src % N;
      bfs(csrs[b], N, s, dist + src * N, path + src * N, queue.data());
    }
  }
}

}  // namespace cpu
}  // namespace pyvl
