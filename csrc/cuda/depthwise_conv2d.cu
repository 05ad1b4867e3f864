// Depthwise convolution and the fused depthwise-separable block on the GPU. See depthwise_conv2d.cuh.
//
// The depthwise kernels are memory-bound: one thread per output (or input-gradient) element, with the element
// index running fastest along the innermost dimension of the layout, so that a warp reads and writes consecutive
// addresses in both NCHW (along W) and NHWC (along C). All index arithmetic is int64: video-sized activations pass
// 2^31 elements. 3x3 kernels (MobileNet's) get a compile-time kernel size so the tap loops unroll.
#include "cuda/depthwise_conv2d.cuh"

#include <algorithm>

namespace pyvl {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Storage <-> accumulation types: half and bfloat16 accumulate in float, like the CPU bindings.

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename AccOf<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Written so that NaN propagates (a NaN compares false both ways), as torch.relu and the CPU kernels do.
template <typename Acc>
__device__ __forceinline__ Acc activate(Acc v, Activation act) {
  if (act == Activation::ReLU) return v < Acc(0) ? Acc(0) : v;
  if (act == Activation::ReLU6) return v < Acc(0) ? Acc(0) : (v > Acc(6) ? Acc(6) : v);
  return v;
}

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over `total` elements: enough to fill an H100 many times over; the loop covers
// the rest, so the grid never exceeds gridDim.x's limit whatever the size.
inline unsigned grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::min<int64_t>(blocks, int64_t(1) << 20));
}

// Strides (in elements) of one (n, c) plane of a dense [N, C, H, W] tensor in `layout`, and the plane's offset.
struct Plane {
  int64_t base, row, col;
};
__device__ __forceinline__ Plane plane_of(Layout layout, int64_t n, int64_t c, int64_t C, int64_t H, int64_t W) {
  if (layout == Layout::NCHW) return {(n * C + c) * H * W, W, 1};
  return {n * H * W * C + c, W * C, C};
}

// Sum over the taps of one output point (oh, ow) of one channel: x plane `xp` (in x), weights `wc` [KH, KW].
// KH_/KW_ > 0 fix the kernel size at compile time; 0 reads it from s.
template <int KH_, int KW_, typename T, typename Acc = typename AccOf<T>::type>
__device__ __forceinline__ Acc depthwise_point(const T* __restrict__ x, Plane xp, const T* __restrict__ wc,
                                               const Conv2dShape& s, int64_t oh, int64_t ow) {
  const int KH = KH_ > 0 ? KH_ : static_cast<int>(s.KH);
  const int KW = KW_ > 0 ? KW_ : static_cast<int>(s.KW);
  const int64_t ih0 = oh * s.stride_h - s.pad_h;
  const int64_t iw0 = ow * s.stride_w - s.pad_w;
  Acc acc = Acc(0);
#pragma unroll
  for (int kh = 0; kh < KH; ++kh) {
    const int64_t ih = ih0 + kh * s.dil_h;
    if (ih < 0 || ih >= s.H) continue;
#pragma unroll
    for (int kw = 0; kw < KW; ++kw) {
      const int64_t iw = iw0 + kw * s.dil_w;
      if (iw < 0 || iw >= s.W) continue;
      acc += to_acc(x[xp.base + ih * xp.row + iw * xp.col]) * to_acc(wc[kh * KW + kw]);
    }
  }
  return acc;
}

// Splits a dense index in `layout` over [N, C, H, W] into (n, c, h, w).
__device__ __forceinline__ void unravel(int64_t i, Layout layout, int64_t C, int64_t H, int64_t W, int64_t& n,
                                        int64_t& c, int64_t& h, int64_t& w) {
  if (layout == Layout::NCHW) {
    w = i % W; i /= W;
    h = i % H; i /= H;
    c = i % C; n = i / C;
  } else {
    c = i % C; i /= C;
    w = i % W; i /= W;
    h = i % H; n = i / H;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Forward: one thread per output element; out is dense in `layout`, so its own index is its offset.

template <int KH_, int KW_, typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
                   T* __restrict__ out, const Conv2dShape s, const Layout layout) {
  using Acc = typename AccOf<T>::type;
  const int64_t total = s.N * s.C * s.OH * s.OW;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, oh, ow;
    unravel(i, layout, s.C, s.OH, s.OW, n, c, oh, ow);
    Acc acc = depthwise_point<KH_, KW_>(x, plane_of(layout, n, c, s.C, s.H, s.W), weight + c * s.KH * s.KW, s, oh,
                                        ow);
    if (bias != nullptr) acc += to_acc(bias[c]);
    out[i] = from_acc<T>(acc);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward input, as a gather (no atomics): input point ih receives grad_out[oh] * w[kh] for every tap with
// oh * stride - pad + kh * dil == ih, i.e. oh = (ih + pad - kh * dil) / stride when that divides exactly and is in
// [0, OH). Same conditions as the CPU kernel.

template <int KH_, int KW_, typename T>
__global__ void __launch_bounds__(kThreads)
    backward_input_kernel(const T* __restrict__ grad_out, const T* __restrict__ weight, T* __restrict__ grad_x,
                          const Conv2dShape s, const Layout layout) {
  using Acc = typename AccOf<T>::type;
  const int KH = KH_ > 0 ? KH_ : static_cast<int>(s.KH);
  const int KW = KW_ > 0 ? KW_ : static_cast<int>(s.KW);
  const int64_t total = s.N * s.C * s.H * s.W;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, ih, iw;
    unravel(i, layout, s.C, s.H, s.W, n, c, ih, iw);
    const Plane gp = plane_of(layout, n, c, s.C, s.OH, s.OW);
    const T* wc = weight + c * s.KH * s.KW;
    Acc acc = Acc(0);
#pragma unroll
    for (int kh = 0; kh < KH; ++kh) {
      const int64_t th = ih + s.pad_h - kh * s.dil_h;
      if (th < 0 || th % s.stride_h != 0) continue;
      const int64_t oh = th / s.stride_h;
      if (oh >= s.OH) continue;
#pragma unroll
      for (int kw = 0; kw < KW; ++kw) {
        const int64_t tw = iw + s.pad_w - kw * s.dil_w;
        if (tw < 0 || tw % s.stride_w != 0) continue;
        const int64_t ow = tw / s.stride_w;
        if (ow >= s.OW) continue;
        acc += to_acc(grad_out[gp.base + oh * gp.row + ow * gp.col]) * to_acc(wc[kh * KW + kw]);
      }
    }
    grad_x[i] = from_acc<T>(acc);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward weight: a reduction over all N*OH*OW output points for each (channel, tap). A block owns one tap of
// one channel (NCHW) or of 32 consecutive channels (NHWC, so a warp reads 32 consecutive addresses) and reduces
// its share in shared memory in a fixed order. When channels x taps alone give too few blocks to fill the GPU,
// the points are split into `splits` ranges (gridDim.z); each block writes its partial sum to a workspace, and a
// second kernel adds the partials in order. No atomics, so the result is deterministic.

constexpr int kTargetBlocks = 1024;         // about 8 blocks per SM on an H100 (132 SMs)
constexpr int64_t kMinPointsPerSplit = 2048;  // below this, a split's fixed cost outweighs its parallelism
constexpr int kMaxSplits = 64;
constexpr int kNhwcChannels = 32;           // NHWC: channels per block (threadIdx.x)
constexpr int kNhwcRows = kThreads / kNhwcChannels;  // NHWC: point lanes per block (threadIdx.y)

inline int64_t backward_weight_base_blocks(const Conv2dShape& s, Layout layout) {
  const int64_t channel_blocks = layout == Layout::NCHW ? s.C : (s.C + kNhwcChannels - 1) / kNhwcChannels;
  return channel_blocks * s.KH * s.KW;
}

inline int backward_weight_splits(const Conv2dShape& s, Layout layout) {
  const int64_t points = s.N * s.OH * s.OW;
  const int64_t base = std::max<int64_t>(1, backward_weight_base_blocks(s, layout));
  int64_t splits = (kTargetBlocks + base - 1) / base;
  splits = std::min<int64_t>(splits, (points + kMinPointsPerSplit - 1) / kMinPointsPerSplit);
  splits = std::min<int64_t>(splits, kMaxSplits);
  return static_cast<int>(std::max<int64_t>(splits, 1));
}

// The [begin, end) range of output points that split z (of gridDim.z) reduces over.
__device__ __forceinline__ void split_range(int64_t points, int64_t& begin, int64_t& end) {
  // Plain comparisons rather than std::min: that is a host function without --expt-relaxed-constexpr.
  const int64_t chunk = (points + gridDim.z - 1) / gridDim.z;
  begin = int64_t(blockIdx.z) * chunk;
  if (begin > points) begin = points;
  end = begin + chunk < points ? begin + chunk : points;
}

// grad_out * x for output point i (flattened n, oh, ow), channel c and tap (kh, kw); 0 where the tap is padding.
template <typename T, typename Acc = typename AccOf<T>::type>
__device__ __forceinline__ Acc weight_grad_term(const T* __restrict__ grad_out, const T* __restrict__ x,
                                                const Conv2dShape& s, Layout layout, int64_t c, int64_t i,
                                                int64_t kh, int64_t kw) {
  const int64_t ow = i % s.OW;
  const int64_t t = i / s.OW;
  const int64_t oh = t % s.OH;
  const int64_t n = t / s.OH;
  const int64_t ih = oh * s.stride_h - s.pad_h + kh * s.dil_h;
  const int64_t iw = ow * s.stride_w - s.pad_w + kw * s.dil_w;
  if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) return Acc(0);
  const Plane gp = plane_of(layout, n, c, s.C, s.OH, s.OW);
  const Plane xp = plane_of(layout, n, c, s.C, s.H, s.W);
  return to_acc(grad_out[gp.base + oh * gp.row + ow * gp.col]) * to_acc(x[xp.base + ih * xp.row + iw * xp.col]);
}

// Stores a finished (c, tap) sum: straight into grad_weight without splits, else into partial[z][c][tap].
template <typename T, typename Acc>
__device__ __forceinline__ void store_weight_grad(T* grad_weight, Acc* partial, const Conv2dShape& s, int64_t c,
                                                  int64_t tap, Acc v) {
  const int64_t taps = s.KH * s.KW;
  if (gridDim.z == 1) {
    grad_weight[c * taps + tap] = from_acc<T>(v);
  } else {
    partial[(int64_t(blockIdx.z) * s.C + c) * taps + tap] = v;
  }
}

// NCHW: grid (C, KH*KW, splits), 1-D block; consecutive threads take consecutive points (consecutive ow).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_weight_nchw_kernel(const T* __restrict__ grad_out, const T* __restrict__ x, T* __restrict__ grad_weight,
                                typename AccOf<T>::type* __restrict__ partial, const Conv2dShape s) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc red[kThreads];
  const int64_t c = blockIdx.x;
  const int64_t tap = blockIdx.y;
  const int64_t kh = tap / s.KW, kw = tap % s.KW;
  int64_t begin, end;
  split_range(s.N * s.OH * s.OW, begin, end);
  Acc acc = Acc(0);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x)
    acc += weight_grad_term(grad_out, x, s, Layout::NCHW, c, i, kh, kw);
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) red[threadIdx.x] += red[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) store_weight_grad(grad_weight, partial, s, c, tap, red[0]);
}

// NHWC: grid (ceil(C/32), KH*KW, splits), block (32, 8): threadIdx.x picks the channel (so a warp reads 32
// consecutive channels of one point), threadIdx.y strides over the points.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_weight_nhwc_kernel(const T* __restrict__ grad_out, const T* __restrict__ x, T* __restrict__ grad_weight,
                                typename AccOf<T>::type* __restrict__ partial, const Conv2dShape s) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc red[kNhwcRows][kNhwcChannels + 1];
  const int64_t c = int64_t(blockIdx.x) * kNhwcChannels + threadIdx.x;
  const int64_t tap = blockIdx.y;
  const int64_t kh = tap / s.KW, kw = tap % s.KW;
  int64_t begin, end;
  split_range(s.N * s.OH * s.OW, begin, end);
  Acc acc = Acc(0);
  if (c < s.C) {
    for (int64_t i = begin + threadIdx.y; i < end; i += kNhwcRows)
      acc += weight_grad_term(grad_out, x, s, Layout::NHWC, c, i, kh, kw);
  }
  red[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < s.C) {
    Acc sum = Acc(0);
#pragma unroll
    for (int r = 0; r < kNhwcRows; ++r) sum += red[r][threadIdx.x];
    store_weight_grad(grad_weight, partial, s, c, tap, sum);
  }
}

// Adds the partials of every split in order: one thread per (c, tap).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_weight_finish_kernel(const typename AccOf<T>::type* __restrict__ partial, T* __restrict__ grad_weight,
                                  const int64_t entries, const int splits) {
  using Acc = typename AccOf<T>::type;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < entries;
       i += int64_t(gridDim.x) * blockDim.x) {
    Acc sum = Acc(0);
    for (int z = 0; z < splits; ++z) sum += partial[z * entries + i];
    grad_weight[i] = from_acc<T>(sum);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Fused depthwise-separable block. The pointwise conv is a GEMM out[co, q] = sum_c pw[co, c] * h[c, q] over the
// flattened output points q = (n, oh, ow); h = act_dw(depthwise(x) + dw_bias) is produced tile by tile straight
// into shared memory, so it never goes to global memory. A block owns kBP points x kBCO output channels and walks
// the input channels kBK at a time: compute the h tile [kBK, kBP], load the pw tile [kBK, kBCO], then each thread
// accumulates a 4x4 register tile. When C_out > kBCO, blocks of different output-channel tiles recompute the same
// h tile; that costs KH*KW MACs per (c, q) and tile against C_out per (c, q) for the GEMM, a small fraction.
//
// Thread (a, b) = (tid % 16, tid / 16). In NCHW, a walks the points (consecutive ow in memory) and b the output
// channels; in NHWC the reverse, so that the 16 lanes with consecutive a store to consecutive addresses either
// way, and each warp's shared-memory reads are 16 consecutive words plus a broadcast (no bank conflicts).

constexpr int kBP = 64;   // output points per block
constexpr int kBCO = 64;  // output channels per block
constexpr int kBK = 16;   // input channels per step
constexpr int kTile = 4;  // register tile: 4 output channels x 4 points per thread, 16 apart
static_assert(kThreads == (kBP / kTile) * (kBCO / kTile), "one thread per 4x4 register tile");
static_assert((kBK * kBP) % kThreads == 0 && (kBK * kBCO) % kThreads == 0, "tiles fill evenly");
static_assert(kThreads % kBP == 0 && kThreads % kBK == 0, "fill mappings keep one coordinate fixed per thread");

template <int KH_, int KW_, typename T>
__global__ void __launch_bounds__(kThreads)
    dsconv2d_kernel(const T* __restrict__ x, const T* __restrict__ dw_weight, const T* __restrict__ dw_bias,
                    const T* __restrict__ pw_weight, const T* __restrict__ pw_bias, T* __restrict__ out,
                    const Conv2dShape s, const int64_t C_out, const Activation act_dw, const Activation act_pw,
                    const Layout layout) {
  using Acc = typename AccOf<T>::type;
  // +1 column: the fills write along the first index in NHWC; the padding spreads those writes over the banks.
  __shared__ Acc h_tile[kBK][kBP + 1];
  __shared__ Acc w_tile[kBK][kBCO + 1];

  const bool nchw = layout == Layout::NCHW;
  const int64_t P = s.OH * s.OW;
  const int64_t points = s.N * P;
  const int64_t q0 = int64_t(blockIdx.x) * kBP;
  const int64_t co0 = int64_t(blockIdx.y) * kBCO;
  const int tid = threadIdx.x;
  const int a = tid % 16, b = tid / 16;
  const int tq = nchw ? a : b;   // this thread's points: q0 + tq + 16 * j
  const int tco = nchw ? b : a;  // this thread's output channels: co0 + tco + 16 * i

  Acc acc[kTile][kTile];
#pragma unroll
  for (int i = 0; i < kTile; ++i)
#pragma unroll
    for (int j = 0; j < kTile; ++j) acc[i][j] = Acc(0);

  for (int64_t c0 = 0; c0 < s.C; c0 += kBK) {
    // h tile. NCHW: a thread keeps one point and takes channels tid/64 + 4r (a warp covers 32 consecutive points);
    // NHWC: a thread keeps one channel and takes points tid/16 + 16r (16 lanes cover 16 consecutive channels).
#pragma unroll
    for (int r = 0; r < kBK * kBP / kThreads; ++r) {
      const int e = tid + r * kThreads;
      const int k = nchw ? e / kBP : e % kBK;
      const int qq = nchw ? e % kBP : e / kBK;
      const int64_t c = c0 + k;
      const int64_t q = q0 + qq;
      Acc v = Acc(0);  // channels past C and points past the end contribute nothing
      if (c < s.C && q < points) {
        const int64_t n = q / P, p = q % P;
        v = depthwise_point<KH_, KW_>(x, plane_of(layout, n, c, s.C, s.H, s.W), dw_weight + c * s.KH * s.KW, s,
                                      p / s.OW, p % s.OW);
        if (dw_bias != nullptr) v += to_acc(dw_bias[c]);
        v = activate(v, act_dw);
      }
      h_tile[k][qq] = v;
    }
    // pw tile: 16 lanes read 16 consecutive input channels of one output channel's row.
#pragma unroll
    for (int r = 0; r < kBK * kBCO / kThreads; ++r) {
      const int e = tid + r * kThreads;
      const int k = e % kBK;
      const int co = e / kBK;
      const int64_t c = c0 + k;
      const int64_t oc = co0 + co;
      w_tile[k][co] = (c < s.C && oc < C_out) ? to_acc(pw_weight[oc * s.C + c]) : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kBK; ++k) {
      Acc hv[kTile], wv[kTile];
#pragma unroll
      for (int j = 0; j < kTile; ++j) hv[j] = h_tile[k][tq + 16 * j];
#pragma unroll
      for (int i = 0; i < kTile; ++i) wv[i] = w_tile[k][tco + 16 * i];
#pragma unroll
      for (int i = 0; i < kTile; ++i)
#pragma unroll
        for (int j = 0; j < kTile; ++j) acc[i][j] += wv[i] * hv[j];
    }
    __syncthreads();  // the next step overwrites the tiles
  }

#pragma unroll
  for (int i = 0; i < kTile; ++i) {
    const int64_t oc = co0 + tco + 16 * i;
    if (oc >= C_out) continue;
    const Acc bias = pw_bias != nullptr ? to_acc(pw_bias[oc]) : Acc(0);
#pragma unroll
    for (int j = 0; j < kTile; ++j) {
      const int64_t q = q0 + tq + 16 * j;
      if (q >= points) continue;
      const T v = from_acc<T>(activate(acc[i][j] + bias, act_pw));
      if (nchw) {
        const int64_t n = q / P, p = q % P;
        out[(n * C_out + oc) * P + p] = v;
      } else {
        out[q * C_out + oc] = v;  // NHWC: the point index q = (n, oh, ow) is already the row
      }
    }
  }
}

inline bool is3x3(const Conv2dShape& s) { return s.KH == 3 && s.KW == 3; }

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Launchers

template <typename T>
cudaError_t depthwise_conv2d_forward(const T* x, const T* weight, const T* bias, T* out, const Conv2dShape& s,
                                     Layout layout, cudaStream_t stream) {
  const int64_t total = s.N * s.C * s.OH * s.OW;
  if (total == 0) return cudaSuccess;
  if (is3x3(s))
    forward_kernel<3, 3, T><<<grid_for(total), kThreads, 0, stream>>>(x, weight, bias, out, s, layout);
  else
    forward_kernel<0, 0, T><<<grid_for(total), kThreads, 0, stream>>>(x, weight, bias, out, s, layout);
  return cudaGetLastError();
}

template <typename T>
cudaError_t depthwise_conv2d_backward_input(const T* grad_out, const T* weight, T* grad_x, const Conv2dShape& s,
                                            Layout layout, cudaStream_t stream) {
  const int64_t total = s.N * s.C * s.H * s.W;
  if (total == 0) return cudaSuccess;
  if (is3x3(s))
    backward_input_kernel<3, 3, T><<<grid_for(total), kThreads, 0, stream>>>(grad_out, weight, grad_x, s, layout);
  else
    backward_input_kernel<0, 0, T><<<grid_for(total), kThreads, 0, stream>>>(grad_out, weight, grad_x, s, layout);
  return cudaGetLastError();
}

template <typename T>
size_t depthwise_conv2d_backward_weight_workspace_bytes(const Conv2dShape& s, Layout layout) {
  const int splits = backward_weight_splits(s, layout);
  if (splits == 1) return 0;
  return static_cast<size_t>(splits) * static_cast<size_t>(s.C * s.KH * s.KW) * sizeof(typename AccOf<T>::type);
}

template <typename T>
cudaError_t depthwise_conv2d_backward_weight(const T* grad_out, const T* x, T* grad_weight, void* workspace,
                                             const Conv2dShape& s, Layout layout, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  const int64_t taps = s.KH * s.KW;
  if (s.C * taps == 0) return cudaSuccess;
  if (taps > 65535) return cudaErrorInvalidConfiguration;  // gridDim.y's limit: a kernel beyond 255x255
  // With no output points (N == 0) the kernels still run and write zeros, as the gradient is zero.
  const int splits = backward_weight_splits(s, layout);
  if (splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  Acc* partial = splits > 1 ? static_cast<Acc*>(workspace) : nullptr;
  if (layout == Layout::NCHW) {
    const dim3 grid(static_cast<unsigned>(s.C), static_cast<unsigned>(taps), static_cast<unsigned>(splits));
    backward_weight_nchw_kernel<T><<<grid, kThreads, 0, stream>>>(grad_out, x, grad_weight, partial, s);
  } else {
    const dim3 grid(static_cast<unsigned>((s.C + kNhwcChannels - 1) / kNhwcChannels), static_cast<unsigned>(taps),
                    static_cast<unsigned>(splits));
    const dim3 block(kNhwcChannels, kNhwcRows);
    backward_weight_nhwc_kernel<T><<<grid, block, 0, stream>>>(grad_out, x, grad_weight, partial, s);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  const int64_t entries = s.C * taps;
  backward_weight_finish_kernel<T><<<grid_for(entries), kThreads, 0, stream>>>(partial, grad_weight, entries, splits);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dsconv2d_forward(const T* x, const T* dw_weight, const T* dw_bias, const T* pw_weight, const T* pw_bias,
                             T* out, const Conv2dShape& s, int64_t C_out, Activation act_dw, Activation act_pw,
                             Layout layout, cudaStream_t stream) {
  const int64_t points = s.N * s.OH * s.OW;
  if (points == 0 || C_out == 0) return cudaSuccess;
  const int64_t co_blocks = (C_out + kBCO - 1) / kBCO;
  if (co_blocks > 65535) return cudaErrorInvalidConfiguration;  // gridDim.y's limit: C_out > 4 million
  const dim3 grid(static_cast<unsigned>((points + kBP - 1) / kBP), static_cast<unsigned>(co_blocks));
  if (is3x3(s))
    dsconv2d_kernel<3, 3, T><<<grid, kThreads, 0, stream>>>(x, dw_weight, dw_bias, pw_weight, pw_bias, out, s, C_out,
                                                            act_dw, act_pw, layout);
  else
    dsconv2d_kernel<0, 0, T><<<grid, kThreads, 0, stream>>>(x, dw_weight, dw_bias, pw_weight, pw_bias, out, s, C_out,
                                                            act_dw, act_pw, layout);
  return cudaGetLastError();
}

#define PYVL_INSTANTIATE(T)                                                                                        \
  template cudaError_t depthwise_conv2d_forward<T>(const T*, const T*, const T*, T*, const Conv2dShape&, Layout,   \
                                                   cudaStream_t);                                                  \
  template cudaError_t depthwise_conv2d_backward_input<T>(const T*, const T*, T*, const Conv2dShape&, Layout,      \
                                                          cudaStream_t);                                           \
  template size_t depthwise_conv2d_backward_weight_workspace_bytes<T>(const Conv2dShape&, Layout);                 \
  template cudaError_t depthwise_conv2d_backward_weight<T>(const T*, const T*, T*, void*, const Conv2dShape&,      \
                                                           Layout, cudaStream_t);                                  \
  template cudaError_t dsconv2d_forward<T>(const T*, const T*, const T*, const T*, const T*, T*, const Conv2dShape&, \
                                           int64_t, Activation, Activation, Layout, cudaStream_t);
PYVL_INSTANTIATE(float)
PYVL_INSTANTIATE(double)
PYVL_INSTANTIATE(__half)
PYVL_INSTANTIATE(__nv_bfloat16)
#undef PYVL_INSTANTIATE

}  // namespace cuda
}  // namespace pyvl
