// Checks the BFS shortest-paths kernel against Graphormer's Floyd-Warshall (algos.pyx) written here as plain loops:
// the same distances and the same path matrix, for batches that take each of the kernel's two schedules (many
// small graphs, few large ones), directed and undirected, with padding nodes, self-loops and a chain cut at 510.
// Exits non-zero on the first mismatch.
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/shortest_paths.h"

namespace {

using pyvl::cpu::kUnreachable;

void floyd_warshall(const bool* adj, int64_t N, int64_t* dist, int64_t* path) {
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < N; ++j) {
      dist[i * N + j] = i == j ? 0 : (adj[i * N + j] ? 1 : kUnreachable);
      path[i * N + j] = -1;
    }
  for (int64_t k = 0; k < N; ++k)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j)
        if (dist[i * N + j] > dist[i * N + k] + dist[k * N + j]) {
          dist[i * N + j] = dist[i * N + k] + dist[k * N + j];
          path[i * N + j] = k;
        }
  for (int64_t e = 0; e < N * N; ++e)
    if (dist[e] >= kUnreachable) dist[e] = path[e] = kUnreachable;
}

bool check(const char* what, const std::vector<char>& adj_bytes, int64_t B, int64_t N) {
  const bool* adj = reinterpret_cast<const bool*>(adj_bytes.data());
  std::vector<int64_t> dist(B * N * N, -7), path(B * N * N, -7), want_d(B * N * N), want_p(B * N * N);
  pyvl::cpu::shortest_paths(adj, B, N, dist.data(), path.data());
  for (int64_t b = 0; b < B; ++b) floyd_warshall(adj + b * N * N, N, want_d.data() + b * N * N,
                                                 want_p.data() + b * N * N);
  for (int64_t e = 0; e < B * N * N; ++e) {
    if (dist[e] != want_d[e] || path[e] != want_p[e]) {
      std::printf("  %s (B=%lld N=%lld): mismatch at %lld: dist %lld want %lld, path %lld want %lld\n", what,
                  (long long)B, (long long)N, (long long)e, (long long)dist[e], (long long)want_d[e],
                  (long long)path[e], (long long)want_p[e]);
      return false;
    }
  }
  return true;
}

std::vector<char> random_batch(int64_t B, int64_t N, double p, bool directed, std::mt19937& rng) {
  std::bernoulli_distribution edge(p);
  std::uniform_int_distribution<int64_t> size(1, N);
  std::vector<char> adj(B * N * N, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = size(rng);  // nodes n.. N-1 are padding
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j)
        if (edge(rng)) {
          adj[(b * N + i) * N + j] = 1;
          if (!directed) adj[(b * N + j) * N + i] = 1;
        }
  }
  return adj;
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  bool ok = true;
  const int64_t shapes[][2] = {{1, 1}, {3, 5}, {40, 23}, {2, 97}, {1, 130}, {64, 31}, {3, 120}};
  for (const auto& s : shapes)
    for (double p : {0.02, 0.08, 0.3})
      for (bool directed : {false, true})
        ok &= check(directed ? "random directed" : "random undirected", random_batch(s[0], s[1], p, directed, rng),
                    s[0], s[1]);
  // A 520-node chain: pairs 510 or more hops apart are unreachable.
  const int64_t n = 520;
  std::vector<char> chain(n * n, 0);
  for (int64_t i = 0; i + 1 < n; ++i) chain[i * n + i + 1] = chain[(i + 1) * n + i] = 1;
  chain[3 * n + 3] = 1;  // a self-loop changes nothing
  ok &= check("chain", chain, 1, n);
  std::printf(ok ? "shortest_paths: ok\n" : "shortest_paths: FAILED\n");
  return ok ? 0 : 1;
}
