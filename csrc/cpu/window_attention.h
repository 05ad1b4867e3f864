// Shifted-window attention (Swin, Swin V2, Video Swin) on raw pointers (no torch), so that CMake can build and
// sanitize these kernels alone; csrc/bindings/window_attention_cpu.cpp turns tensors into calls. The semantics
// (geometry, shift regions, padding tokens, bias index, cosine attention) are those of pyvl/ops/window_attention.py.
#pragma once
#include <cstdint>

namespace pyvl {

// Tokens (B, T, H, W, heads, d); a 2D problem is T = 1 with window[0] = 1 and shift[0] = 0.
struct WindowAttentionShape {
  int64_t B, T, H, W, heads, d;
  int64_t window[3];
  int64_t shift[3];  // effective shifts: already 0 where the window covers the padded size
  bool pad_first;    // true: pad then roll (torchvision); false: roll then pad (timm)
  double mask_value; // added to the logits of query/key pairs in different shift regions (<= 0, may be -inf)
  double scale;      // dot-product scale; unused with logit_scale (cosine attention)
};

// Element strides of a (B, T, H, W, heads, d) view; the stride of d is 1.
struct TokenStrides {
  int64_t b, t, h, w, head;
};

template <typename T>
struct WindowAttentionInputs {
  const T* q;
  TokenStrides q_strides;
  const T* k;
  TokenStrides k_strides;
  const T* v;
  TokenStrides v_strides;
  const T* rel_bias_table;  // [prod(2w - 1), heads] contiguous, or null
  const T* rel_bias;        // [heads, N, N] contiguous, or null (not both)
  const T* logit_scale;     // [heads]: cosine attention with tau = exp(min(logit_scale, log 100)); or null
  const T* pad_k;           // [heads, d] key of a padding token, or null for zeros
  const T* pad_v;           // [heads, d] value of a padding token, or null for zeros
};

// Every output pointer may be null (that gradient is not computed). dq, dk, dv are contiguous
// (B, T, H, W, heads, d); the others have their input's (contiguous) shape. All are written, not accumulated.
template <typename T>
struct WindowAttentionGrads {
  T* dq;
  T* dk;
  T* dv;
  T* d_rel_bias_table;
  T* d_rel_bias;
  T* d_logit_scale;
  T* d_pad_k;
  T* d_pad_v;
};

namespace cpu {

// out: contiguous (B, T, H, W, heads, d). lse: contiguous (B, T, H, W, heads), the log-sum-exp of each query's
// logits. Parallel over (batch, window, head) with OpenMP.
template <typename T>
void window_attention_forward(const WindowAttentionShape& s, const WindowAttentionInputs<T>& in, T* out, T* lse);

// grad_out: a (B, T, H, W, heads, d) view with the given strides. The probabilities are recomputed from q and k
// as the forward computes them (max, exp, sum: lse would carry an absolute error of ulp(lse), large beside the
// probabilities when the logits are large); the forward's output is not needed either: the softmax backward
// takes rowsum(P * dP), as autograd does, rather than the equal rowsum(dO * O). Bias, logit-scale and padding gradients are summed over the
// windows in per-thread partials reduced in thread order, so a fixed thread count gives bitwise-equal results.
template <typename T>
void window_attention_backward(const WindowAttentionShape& s, const WindowAttentionInputs<T>& in, const T* grad_out,
                               const TokenStrides& grad_out_strides, const WindowAttentionGrads<T>& grads);

}  // namespace cpu
}  // namespace pyvl
