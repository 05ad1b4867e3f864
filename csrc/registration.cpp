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
}

// `import pyvl._C` loads this library, which runs the registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
