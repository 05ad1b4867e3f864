// A 32-byte vector of float or double for the CPU kernels, written with GCC/Clang vector extensions so the same
// code compiles to AVX2 under -march=native and to pairs of SSE instructions in a portable build (PYVL_PORTABLE,
// or the standalone CMake build). Kernels templated on the vector type also take T itself as a one-lane "vector",
// which is how they handle channel tails.
//
// fmadd is explicit: the extension is built with -std=c++20, which makes GCC default to -ffp-contract=off, so
// `a * b + c` would never become an FMA.
#pragma once
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

// Lanes of V over elements of T (1 when V is T).
template <typename T, typename V>
constexpr int lanes = sizeof(V) / sizeof(T);

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
#if defined(__AVX__)
  asm("" : "+x"(v));
#else
  (void)v;
#endif
}

}  // namespace simd
}  // namespace cpu
}  // namespace pyvl
