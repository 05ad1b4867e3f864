// Sequential (memory-bounded) attention on raw pointers (no torch): softmax(q k^T * scale + bias) v computed
// block by block with an online softmax, so that no [N, M] buffer exists beyond the caller's bias and its
// gradient. The bindings in csrc/bindings/ turn tensors into calls.
#pragma once
#include <cstdint>

namespace pyvl {

// q [B, H, N, D], k [B, H, M, D], v [B, H, M, DV] and the gradients are HeadRows (any strides, unit stride along the
// last dim); out [B*H, N, DV] and lse [B*H, N] are dense, row-major.
struct AttentionShape {
  int64_t B, H;  // batch and heads
  int64_t N, M;  // queries and keys
  int64_t D, DV;  // head dims of q/k and of v
  double scale;
};

// The rows of a [B, H, L, E] tensor whose last dim is contiguous: row i of head (b, h) starts at
// data + b*sb + h*sh + i*sn. Heads are addressed by bh = b*H + h. A transposed view such as
// x.view(B, L, H, E).transpose(1, 2) (Graphormer's, and most models' q, k, v) needs no copy.
template <typename T>
struct HeadRows {
  T* data;
  int64_t H, sb, sh, sn;
  T* row(int64_t bh, int64_t i) const { return data + (bh / H) * sb + (bh % H) * sh + i * sn; }
  // A dense, row-major [B, H, L, E] tensor.
  static HeadRows dense(T* p, int64_t H, int64_t L, int64_t E) { return HeadRows{p, H, H * L * E, L * E, E}; }
};

// An additive bias broadcast to [B, H, N, M] by its strides: element (b, h, i, j) at b*sb + h*sh + i*sn + j*sm,
// with 0 along broadcast dims; sm is 0 or 1. data == nullptr: no bias.
template <typename T>
struct BiasView {
  const T* data;
  int64_t sb, sh, sn, sm;
};

namespace cpu {

// out and lse (the per-row log-sum-exp of the scaled, biased scores) are written. Rows whose scores are all
// -inf give NaN (as torch.softmax); NaN propagates. Parallel over (batch*heads, query blocks).
template <typename T>
void sequential_attention_forward(HeadRows<const T> q, HeadRows<const T> k, HeadRows<const T> v, BiasView<T> bias,
                                  T* out, T* lse, const AttentionShape& s);

// grad_q, grad_k, grad_v are written. grad_bias (null: not wanted) is written dense as [bias_B, bias_H, N, M]
// with bias_B in {1, B} and bias_H in {1, H}: the score gradient summed over the batch / head dims the bias is
// broadcast along. Every sum runs in a fixed order, without atomics: the result is bitwise the same run to run,
// whatever the thread count.
template <typename T>
void sequential_attention_backward(HeadRows<const T> grad_out, HeadRows<const T> q, HeadRows<const T> k,
                                   HeadRows<const T> v, BiasView<T> bias, const T* out, const T* lse,
                                   HeadRows<T> grad_q, HeadRows<T> grad_k, HeadRows<T> grad_v, T* grad_bias,
                                   int64_t bias_B, int64_t bias_H, const AttentionShape& s);

}  // namespace cpu
}  // namespace pyvl
