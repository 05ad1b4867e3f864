// The fused depthwise-separable block on the CPU. (Straightforward first version; the fast kernel replaces it.)
#include <algorithm>
#include <vector>

#include "cpu/depthwise_conv2d.h"

namespace pyvl {
namespace cpu {
namespace {

template <typename T>
inline T activate(T v, Activation act) {
  switch (act) {
    case Activation::ReLU: return std::max(v, T(0));
    case Activation::ReLU6: return std::min(std::max(v, T(0)), T(6));
    default: return v;
  }
}

}  // namespace

template <typename T>
void dsconv2d_forward(const T* x, const T* dw_weight, const T* dw_bias, const T* pw_weight, const T* pw_bias, T* out,
                      const Conv2dShape& s, int64_t C_out, Activation act_dw, Activation act_pw, Layout layout) {
  const int64_t P = s.OH * s.OW;
  std::vector<T> mid(static_cast<size_t>(s.N * s.C * P));  // NCHW intermediate
  depthwise_conv2d_forward<T>(x, dw_weight, dw_bias, mid.data(), s, Layout::NCHW == layout ? Layout::NCHW : layout);
  // Bring the intermediate to NCHW whatever the input layout, then apply the pointwise conv.
  std::vector<T> nchw;
  const T* m = mid.data();
  if (layout == Layout::NHWC) {
    nchw.resize(mid.size());
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t p = 0; p < P; ++p)
        for (int64_t c = 0; c < s.C; ++c) nchw[(n * s.C + c) * P + p] = mid[(n * P + p) * s.C + c];
    m = nchw.data();
  }
#pragma omp parallel for collapse(2)
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t o = 0; o < C_out; ++o) {
      for (int64_t p = 0; p < P; ++p) {
        T acc = pw_bias ? pw_bias[o] : T(0);
        for (int64_t c = 0; c < s.C; ++c) acc += pw_weight[o * s.C + c] * activate(m[(n * s.C + c) * P + p], act_dw);
        const T v = activate(acc, act_pw);
        if (layout == Layout::NCHW)
          out[(n * C_out + o) * P + p] = v;
        else
          out[(n * P + p) * C_out + o] = v;
      }
    }
  }
}

template void dsconv2d_forward<float>(const float*, const float*, const float*, const float*, const float*, float*,
                                      const Conv2dShape&, int64_t, Activation, Activation, Layout);
template void dsconv2d_forward<double>(const double*, const double*, const double*, const double*, const double*,
                                       double*, const Conv2dShape&, int64_t, Activation, Activation, Layout);

}  // namespace cpu
}  // namespace pyvl
