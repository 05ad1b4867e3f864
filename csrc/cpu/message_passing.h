// Message passing by gather + add + scatter-sum in one pass (GIN's aggregation with edge features):
//
//   out[i] = sum over edges e with dst[e] == i of (x[src[e]] + edge[e])        out: [n_out, d]
//
// The edges are bucketed by destination (a stable counting sort, O(E + n_out)), so each output row is owned by
// one thread: no atomics, and every row sums its edges in their input order whatever the thread count, which
// makes the result deterministic and equal, bit for bit, to a sequential index_add_ of (x[src] + edge).
// No [E, d] message tensor exists. The backward of x is the same kernel with src and dst swapped (the
// transposed scatter); the backward of edge is a gather of the output gradient by dst.
#pragma once
#include <cstdint>

namespace pyvl {
namespace cpu {

// x: rows of d elements x_row_stride apart (n_in rows); edge: rows edge_row_stride apart, or null (no edge term);
// src, dst: num_edges indices. out: n_out dense rows of d, fully written (rows with no edge are 0).
// Returns -1, or the position of the first edge whose src is outside [0, n_in) or dst outside [0, n_out); then
// out is left unwritten.
template <typename T>
int64_t gather_scatter_add(const T* x, int64_t x_row_stride, int64_t n_in, const T* edge, int64_t edge_row_stride,
                           const int64_t* src, const int64_t* dst, int64_t num_edges, int64_t n_out, int64_t d,
                           T* out);

}  // namespace cpu
}  // namespace pyvl
