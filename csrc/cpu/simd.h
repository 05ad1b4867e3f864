// A 32-byte vector of float or double for the CPU kernels, written with GCC/Clang vector extensions so the same
// code compiles to AVX2 under -march=native and to pairs of SSE instructions in a portable build (PYVL_PORTABLE,
// or the standalone CMake build). Kernels templated on the vector type also take T itself as a one-lane "vector",
// which is how they handle channel tails.
//
// fmadd is explicit: the extension is built with -std=c++20, which makes GCC default to -ffp-contract=off, so
// `a * b + c` would never become an FMA.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__AVX__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace pyvl {
namespace cpu {
namespace simd {

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <typename T>
using vec_t = typename Vec<T>::type;

#if defined(__AVX512F__)
// A 64-byte vector of floats, for the kernels' AVX-512 paths (defined only there: passing it by value without
// AVX-512 changes the ABI).
typedef float vec512f __attribute__((vector_size(64)));
#endif

// The widest vector of T the build has: 64 bytes of float under AVX-512, else the 32-byte vec_t.
template <typename T>
struct Wide {
  using type = vec_t<T>;
};
#if defined(__AVX512F__)
template <>
struct Wide<float> {
  using type = vec512f;
};
#endif
template <typename T>
using wide_t = typename Wide<T>::type;

// Lanes of V over elements of T (1 when V is T).
template <typename T, typename V>
constexpr int lanes = sizeof(V) / sizeof(T);

// Elements of T in one 64-byte cache line.
template <typename T>
constexpr int64_t line_elems = 64 / static_cast<int64_t>(sizeof(T));

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename V, typename T>
inline V broadcast(T s) {
  return V{} + s;
}

#ifdef __FMA__
inline float fmadd(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline double fmadd(double a, double b, double c) { return __builtin_fma(a, b, c); }
#else  // without hardware FMA, std::fma is a slow library call
inline float fmadd(float a, float b, float c) { return a * b + c; }
inline double fmadd(double a, double b, double c) { return a * b + c; }
#endif
inline vec_t<float> fmadd(vec_t<float> a, vec_t<float> b, vec_t<float> c) {
#if defined(__AVX__) && defined(__FMA__)
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}
#if defined(__AVX512F__)
inline vec512f fmadd(vec512f a, vec512f b, vec512f c) { return _mm512_fmadd_ps(a, b, c); }
#endif
inline vec_t<double> fmadd(vec_t<double> a, vec_t<double> b, vec_t<double> c) {
#if defined(__AVX__) && defined(__FMA__)
  return _mm256_fmadd_pd(a, b, c);
#else
  return a * b + c;
#endif
}

// An empty asm that claims to modify v: the compiler must hold v in a register here, so it cannot fold the load
// that produced v into several FMAs as memory operands (which re-reads memory once per use).
template <typename V>
inline void pin(V& v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));  // any of the 32 vector registers
#elif defined(__AVX__)
  asm("" : "+x"(v));
#else
  (void)v;
#endif
}

}  // namespace simd
}  // namespace cpu
}  // namespace pyvl

#if defined(__AVX2__) && defined(__FMA__)
namespace pyvl {
namespace cpu {
namespace simd {

// The float vector operations the exp below is written in: 8 lanes (AVX2), or 16 (AVX-512, where the selects
// are mask registers).
struct F32x8 {
  using V = __m256;
  static constexpr int lanes = 8;
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V a) { _mm256_storeu_ps(p, a); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static V round(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // 2^k for integral k in float's normal exponent range, from the exponent bits
  static V pow2(V k) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23));
  }
  // y, with 0 where x < lo and x itself where x is NaN
  static V flush_and_keep_nan(V y, V x, V lo) {
    y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  }
  static float sum(V a) {
    alignas(32) float l[8];
    _mm256_store_ps(l, a);
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
  }
};

#if defined(__AVX512F__)
struct F32x16 {
  using V = __m512;
  static constexpr int lanes = 16;
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V a) { _mm512_storeu_ps(p, a); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static V round(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V pow2(V k) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23));
  }
  static V flush_and_keep_nan(V y, V x, V lo) {
    y = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ), y);
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), y, x);
  }
  static float sum(V a) { return _mm512_reduce_add_ps(a); }
};
#endif

// exp of a float vector without libm (glibc vectorizes exp only under -ffast-math, which would break the NaN
// policy): Cody-Waite reduction x = k ln2 + r with ln2 split in two, Cephes' degree-6 polynomial for exp(r) (about
// 1 ulp), 2^k from the exponent bits. Results below float's smallest normal are flushed to 0, so exp(-inf) and the
// attention masks give exactly 0; NaN stays NaN. Every width gives lane for lane the same result. Shared by the
// attention kernels' softmax.
template <class O>
inline typename O::V exp(typename O::V x) {
  const auto lo = O::set1(-87.3365447504f);
  const auto xc = O::max(lo, O::min(O::set1(88.3762626647f), x));
  const auto k = O::round(O::mul(xc, O::set1(1.44269504089f)));
  auto r = O::fnmadd(k, O::set1(0.693359375f), xc);
  r = O::fnmadd(k, O::set1(-2.12194440e-4f), r);
  auto p = O::set1(1.9875691500e-4f);
  p = O::fmadd(p, r, O::set1(1.3981999507e-3f));
  p = O::fmadd(p, r, O::set1(8.3334519073e-3f));
  p = O::fmadd(p, r, O::set1(4.1665795894e-2f));
  p = O::fmadd(p, r, O::set1(1.6666665459e-1f));
  p = O::fmadd(p, r, O::set1(5.0000001201e-1f));
  p = O::fmadd(p, O::mul(r, r), O::add(r, O::set1(1.0f)));
  return O::flush_and_keep_nan(O::mul(p, O::pow2(k)), x, lo);
}

// Columns [j0, n) of rows r0 and r1 (r1 may be null: one row) in whole steps of O::lanes: x = exp(x - shift), the
// results added into acc0 / acc1 (lane-parallel partial sums, a fixed order). Returns where it stopped (the first
// column of a partial step). Two rows give two independent exp chains, which one short row cannot.
template <class O>
inline int64_t exp_shifted_rows(float* r0, float* r1, float s0, float s1, int64_t j0, int64_t n, float& acc0,
                                float& acc1) {
  using V = typename O::V;
  const V v0 = O::set1(s0), v1 = O::set1(s1);
  V a0 = O::set1(0.f), a1 = O::set1(0.f);
  int64_t j = j0;
  for (; j + O::lanes <= n; j += O::lanes) {
    const V y0 = exp<O>(O::sub(O::load(r0 + j), v0));
    O::store(r0 + j, y0);
    a0 = O::add(a0, y0);
    if (r1) {
      const V y1 = exp<O>(O::sub(O::load(r1 + j), v1));
      O::store(r1 + j, y1);
      a1 = O::add(a1, y1);
    }
  }
  acc0 += O::sum(a0);
  acc1 += O::sum(a1);
  return j;
}

// The widest float vector operations of the build.
#if defined(__AVX512F__)
using F32xW = F32x16;
#else
using F32xW = F32x8;
#endif

}  // namespace simd
}  // namespace cpu
}  // namespace pyvl
#endif
