// Every pyvl op schema, declared once. Implementations register per device in csrc/bindings/
// (TORCH_LIBRARY_IMPL); fake (meta) kernels and autograd are registered from Python in pyvl/ops/.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(pyvl, m) {
  // Depthwise convolution. weight is [C, 1, KH, KW]; the output keeps x's memory format (NCHW or channels_last).
  m.def("depthwise_conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation)"
        " -> Tensor");
  m.def("depthwise_conv2d_backward_input(Tensor grad_out, Tensor weight, int[2] input_size, int[2] stride,"
        " int[2] padding, int[2] dilation) -> Tensor");
  m.def("depthwise_conv2d_backward_weight(Tensor grad_out, Tensor x, int[2] kernel_size, int[2] stride,"
        " int[2] padding, int[2] dilation) -> Tensor");
  // Fused depthwise-separable block: act_pw(pw . act_dw(dw * x + dw_bias) + pw_bias); pw_weight is [C_out, C].
  // Activations: 0 none, 1 relu, 2 relu6.
  m.def("dsconv2d(Tensor x, Tensor dw_weight, Tensor? dw_bias, Tensor pw_weight, Tensor? pw_bias, int[2] stride,"
        " int[2] padding, int[2] dilation, int dw_activation, int pw_activation) -> Tensor");
  // Sequential attention: softmax(q k^T * scale + bias) v by blocks with an online softmax. q [B, H, N, d],
  // k [B, H, M, d], v [B, H, M, dv]; bias 4-D, each dim 1 or full; lse [B, H, N] is the per-row log-sum-exp the
  // backward recomputes the probabilities from. grad_bias has bias's shape (empty when not wanted).
  m.def("sequential_attention(Tensor q, Tensor k, Tensor v, Tensor? bias, float scale, bool deterministic)"
        " -> (Tensor, Tensor)");
  m.def("sequential_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor out,"
        " Tensor lse, float scale, bool bias_requires_grad, bool deterministic) -> (Tensor, Tensor, Tensor, Tensor)");
  // Shifted-window attention (Swin, Swin V2, Video Swin); the semantics and the argument conventions are in
  // pyvl/ops/window_attention.py. lse: (B, *S, heads), float32 (float64 for float64 inputs).
  m.def("window_attention(Tensor q, Tensor k, Tensor v, int[] window, int[] shift, Tensor? rel_bias_table,"
        " Tensor? rel_bias, Tensor? logit_scale, float? scale, Tensor? pad_k, Tensor? pad_v, bool pad_first,"
        " float mask_value) -> (Tensor out, Tensor lse)");
  m.def("window_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " int[] window, int[] shift, Tensor? rel_bias_table, Tensor? rel_bias, Tensor? logit_scale, float? scale,"
        " Tensor? pad_k, Tensor? pad_v, bool pad_first, float mask_value, bool[] needs) -> (Tensor dq, Tensor dk,"
        " Tensor dv, Tensor d_rel_bias_table, Tensor d_rel_bias, Tensor d_logit_scale, Tensor d_pad_k,"
        " Tensor d_pad_v)");
  // Similarity logits: scale * normalize(a) @ normalize(b)^T + bias per batch; a [B, N, d], b [B, M, d] (a batch
  // stride of 0 broadcasts); scale and bias have one element. Backward in pyvl/ops/contrastive.py (two matmuls).
  m.def("similarity_logits(Tensor a, Tensor b, Tensor scale, Tensor? bias, bool normalize) -> Tensor");
  // Contrastive statistics of the block of logits L = scale * x @ y^T + bias without storing it (csrc/cpu/contrastive.h):
  // kind 0 (softmax): row = logsumexp over columns [n], col = logsumexp over rows [m]; kind 1 (sigmoid): row = sum of
  // softplus over columns [n], col empty; diag[i] = L[i, i + diag_offset]. float32 (float64 for float64 inputs).
  m.def("contrastive_stats(Tensor x, Tensor y, Tensor logit_scale, Tensor? logit_bias, int kind, int diag_offset)"
        " -> (Tensor row, Tensor col, Tensor diag)");
  m.def("contrastive_stats_backward(Tensor grad_row, Tensor grad_col, Tensor grad_diag, Tensor x, Tensor y,"
        " Tensor logit_scale, Tensor? logit_bias, Tensor row, Tensor col, int kind, int diag_offset) -> (Tensor grad_x,"
        " Tensor grad_y, Tensor grad_logit_scale, Tensor grad_logit_bias)");
  // Message passing (GIN with edge features): out[i] = sum over edges e with dst[e] == i of (x[src[e]] + edge_attr[e]);
  // x [N, d], src / dst int64 [E], edge_attr [E, d] or None, out [num_out, d]. Backward in pyvl/ops/message_passing.py.
  m.def("gather_scatter_add(Tensor x, Tensor src, Tensor dst, Tensor? edge_attr, int num_out) -> Tensor");
  // All-pairs shortest paths of a batch of unweighted graphs (adj bool [B, N, N], edge i -> j where adj[b, i, j]):
  // dist and Floyd-Warshall's path matrix as Graphormer's algos.pyx gives them (int64 [B, N, N]; unreachable 510);
  // csrc/cpu/shortest_paths.h states the tie-breaking. Integer outputs, no gradient.
  m.def("shortest_paths(Tensor adj) -> (Tensor dist, Tensor path)");
}

// `import pyvl._C` loads this library, which runs the registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
