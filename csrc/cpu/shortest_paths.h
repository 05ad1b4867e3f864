// All-pairs shortest paths on unweighted graphs, batched, by one breadth-first search per source: O(N * E) per
// graph where Floyd-Warshall is O(N^3), which wins on sparse graphs such as molecules (E ~ N).
//
// The result is exactly Graphormer's algos.pyx floyd_warshall (microsoft/Graphormer graphormer/data/algos.pyx):
//   dist[i][j]  hops from i to j along edges i -> j (adj[i][j] != 0); 0 on the diagonal; kUnreachable (510) when
//               j cannot be reached from i in fewer than 510 hops.
//   path[i][j]  Floyd-Warshall's path matrix: -1 when i == j or j is one hop from i; kUnreachable when unreachable;
//               else an intermediate node k of the chosen shortest path, which is recovered recursively as
//               path(i, k) + [k] + path(k, j).
// Floyd-Warshall with strict improvement records, for each pair, the smallest k such that a shortest path exists
// whose intermediate nodes are all <= k: the minimum, over the shortest paths, of the largest intermediate node.
// The BFS computes that label in the same pass: for j reached from parents p in the previous layer,
//   path[i][j] = min over parents p of (p == i ? -1 : max(path[i][p], p)),
// so both backends give the same matrix and the same tie-breaking between equal-length paths.
#pragma once
#include <cstdint>

namespace pyvl {
namespace cpu {

constexpr int64_t kUnreachable = 510;

// adj: [B, N, N] dense (nonzero = edge i -> j); dist, path: [B, N, N] dense, written entirely. OpenMP over
// (graph, source) pairs.
void shortest_paths(const bool* adj, int64_t B, int64_t N, int64_t* dist, int64_t* path);

}  // namespace cpu
}  // namespace pyvl
