// Depthwise convolution on the CPU. (Straightforward first version; the fast kernels replace it.)
#include "cpu/depthwise_conv2d.h"

#include <algorithm>

namespace pyvl {
namespace cpu {
namespace {

// Element offset of (n, c, h, w) in a dense tensor of the given layout.
inline int64_t offset(Layout layout, int64_t n, int64_t c, int64_t h, int64_t w, int64_t C, int64_t H, int64_t W) {
  return layout == Layout::NCHW ? ((n * C + c) * H + h) * W + w : ((n * H + h) * W + w) * C + c;
}

}  // namespace

template <typename T>
void depthwise_conv2d_forward(const T* x, const T* weight, const T* bias, T* out, const Conv2dShape& s,
                              Layout layout) {
#pragma omp parallel for collapse(2)
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t c = 0; c < s.C; ++c) {
      const T* wc = weight + c * s.KH * s.KW;
      for (int64_t oh = 0; oh < s.OH; ++oh) {
        for (int64_t ow = 0; ow < s.OW; ++ow) {
          T acc = bias ? bias[c] : T(0);
          for (int64_t kh = 0; kh < s.KH; ++kh) {
            const int64_t ih = oh * s.stride_h - s.pad_h + kh * s.dil_h;
            if (ih < 0 || ih >= s.H) continue;
            for (int64_t kw = 0; kw < s.KW; ++kw) {
              const int64_t iw = ow * s.stride_w - s.pad_w + kw * s.dil_w;
              if (iw < 0 || iw >= s.W) continue;
              acc += x[offset(layout, n, c, ih, iw, s.C, s.H, s.W)] * wc[kh * s.KW + kw];
            }
          }
          out[offset(layout, n, c, oh, ow, s.C, s.OH, s.OW)] = acc;
        }
      }
    }
  }
}

template <typename T>
void depthwise_conv2d_backward_input(const T* grad_out, const T* weight, T* grad_x, const Conv2dShape& s,
                                     Layout layout) {
#pragma omp parallel for collapse(2)
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t c = 0; c < s.C; ++c) {
      const T* wc = weight + c * s.KH * s.KW;
      for (int64_t ih = 0; ih < s.H; ++ih) {
        for (int64_t iw = 0; iw < s.W; ++iw) {
          T acc = T(0);
          for (int64_t kh = 0; kh < s.KH; ++kh) {
            const int64_t th = ih + s.pad_h - kh * s.dil_h;
            if (th < 0 || th % s.stride_h != 0 || th / s.stride_h >= s.OH) continue;
            for (int64_t kw = 0; kw < s.KW; ++kw) {
              const int64_t tw = iw + s.pad_w - kw * s.dil_w;
              if (tw < 0 || tw % s.stride_w != 0 || tw / s.stride_w >= s.OW) continue;
              acc += grad_out[offset(layout, n, c, th / s.stride_h, tw / s.stride_w, s.C, s.OH, s.OW)] *
                     wc[kh * s.KW + kw];
            }
          }
          grad_x[offset(layout, n, c, ih, iw, s.C, s.H, s.W)] = acc;
        }
      }
    }
  }
}

template <typename T>
void depthwise_conv2d_backward_weight(const T* grad_out, const T* x, T* grad_weight, const Conv2dShape& s,
                                      Layout layout) {
#pragma omp parallel for
  for (int64_t c = 0; c < s.C; ++c) {
    for (int64_t kh = 0; kh < s.KH; ++kh) {
      for (int64_t kw = 0; kw < s.KW; ++kw) {
        T acc = T(0);
        for (int64_t n = 0; n < s.N; ++n) {
          for (int64_t oh = 0; oh < s.OH; ++oh) {
            const int64_t ih = oh * s.stride_h - s.pad_h + kh * s.dil_h;
            if (ih < 0 || ih >= s.H) continue;
            for (int64_t ow = 0; ow < s.OW; ++ow) {
              const int64_t iw = ow * s.stride_w - s.pad_w + kw * s.dil_w;
              if (iw < 0 || iw >= s.W) continue;
              acc += grad_out[offset(layout, n, c, oh, ow, s.C, s.OH, s.OW)] *
                     x[offset(layout, n, c, ih, iw, s.C, s.H, s.W)];
            }
          }
        }
        grad_weight[(c * s.KH + kh) * s.KW + kw] = acc;
      }
    }
  }
}

#define PYVL_INSTANTIATE(T)                                                                                   \
  template void depthwise_conv2d_forward<T>(const T*, const T*, const T*, T*, const Conv2dShape&, Layout);  \
  template void depthwise_conv2d_backward_input<T>(const T*, const T*, T*, const Conv2dShape&, Layout);     \
  template void depthwise_conv2d_backward_weight<T>(const T*, const T*, T*, const Conv2dShape&, Layout);
PYVL_INSTANTIATE(float)
PYVL_INSTANTIATE(double)
#undef PYVL_INSTANTIATE

}  // namespace cpu
}  // namespace pyvl
