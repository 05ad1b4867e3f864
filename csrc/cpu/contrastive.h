// The contrastive losses' per-row and per-column statistics over a block of logits, computed tile by tile so that
// no n x m matrix exists in the forward or the backward (memory O((n + m) d)).
//
// Logits L[i, j] = scale * <x_i, y_j> + bias for x [n, d] (image rows) and y [m, d] (text rows), both contiguous.
//   Softmax (CLIP):   row[i] = logsumexp_j L[i, j],   col[j] = logsumexp_i L[i, j]
//   Sigmoid (SigLIP): row[i] = sum_j softplus(L[i, j]); no col
//   Both:             diag[i] = L[i, i + diag_offset] (the matched pair's logit; 0 where that column is outside)
// pyvl/ops/contrastive.py assembles the losses from these; across processes the block is a rank's rows against
// every rank's columns (diag_offset = the rank's first row), and col is the partial logsumexp over its rows.
//
// Backward: with cotangents grad_row [n] and grad_col [m] (softmax) of the statistics, the cotangent of a logit is
//   G[i, j] = grad_row[i] * exp(L[i, j] - row[i]) + grad_col[j] * exp(L[i, j] - col[j])    (softmax)
//   G[i, j] = grad_row[i] * sigmoid(L[i, j])                                                 (sigmoid)
// plus grad_diag[i] at (i, i + diag_offset), and grad_x = scale G y, grad_y = scale G^T x, grad_scale = sum G * <x_i, y_j>, grad_bias = sum G, with the
// logits recomputed tile by tile.
#pragma once
#include <cstdint>

namespace pyvl {
namespace cpu {

enum class ContrastiveKind : int64_t { Softmax = 0, Sigmoid = 1 };

// row, diag: [n]; col: [m] for Softmax (ignored, may be null, for Sigmoid).
template <typename T>
void contrastive_stats_forward(const T* x, const T* y, int64_t n, int64_t m, int64_t d, T scale, T bias,
                               ContrastiveKind kind, int64_t diag_offset, T* row, T* col, T* diag);

// grad_x [n, d] and grad_y [m, d] are written (either may be null: not computed). grad_col may be null for
// Sigmoid. grad_scale and grad_bias receive the sums (in double).
template <typename T>
void contrastive_stats_backward(const T* x, const T* y, int64_t n, int64_t m, int64_t d, T scale, T bias,
                                ContrastiveKind kind, int64_t diag_offset, const T* row, const T* col,
                                const T* grad_row, const T* grad_col, const T* grad_diag, T* grad_x, T* grad_y, double* grad_scale, double* grad_bias);

}  // namespace cpu
}  // namespace pyvl
