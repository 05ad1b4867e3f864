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

// exp of 8 floats without libm (glibc vectorizes exp only under -ffast-math, which would break the NaN policy):
// Cody-Waite reduction x = k ln2 + r with ln2 split in two, Cephes' degree-6 polynomial for exp(r) (about 1 ulp),
// 2^k from the exponent bits. Results below float's smallest normal are flushed to 0, so exp(-inf) and the
// attention masks give exactly 0; NaN stays NaN. Shared by the attention kernels' softmax.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3365447504f);
  __m256 xc = _mm256_max_ps(lo, _mm256_min_ps(_mm256_set1_ps(88.3762626647f), x));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504089f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_blendv_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), _mm256_setzero_ps(),
                                    _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

}  // namespace simd
}  // namespace cpu
}  // namespace pyvl
#endif
