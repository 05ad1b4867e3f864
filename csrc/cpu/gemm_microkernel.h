// Register-blocked GEMM micro-kernel for the CPU kernels: acc[MR][NR] = sum_k A(i, k) * B(k, j).
// A is read by broadcast with a row stride and a k stride (so it can be a packed [k][MR] panel or plain
// row-major rows); B is read as NR contiguous values per k (a packed panel or a row-major matrix with ldb).
// The caller applies bias, activation and the store from `acc`, which keeps one kernel for every epilogue
// and both output layouts; the round trip through `acc` costs MR*NR stores per MR*NR*K FMAs.
#pragma once
#include <cstdint>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace pyvl {
namespace cpu {

// 6 x 16 floats = 12 ymm accumulators + 2 for B + 1 broadcast: all 16 AVX2 registers minus one.
constexpr int kGemmMR = 6;
constexpr int kGemmNR = 16;

// The portable tile of any size (double, and float without AVX2).
template <int MR, int NR, typename T>
inline void gemm_micro_any(int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb,
                           T acc[MR][NR]) {
  T c[MR][NR] = {};
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    const T* a = A + k * a_ks;
    for (int i = 0; i < MR; ++i) {
      const T ai = a[i * a_rs];
      for (int j = 0; j < NR; ++j) c[i][j] += ai * b[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = c[i][j];
}

template <typename T>
inline void gemm_micro(int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb,
                       T acc[kGemmMR][kGemmNR]) {
  gemm_micro_any<kGemmMR, kGemmNR>(K, A, a_rs, a_ks, B, ldb, acc);
}

#if defined(__AVX2__) && defined(__FMA__)
template <>
inline void gemm_micro<float>(int64_t K, const float* A, int64_t a_rs, int64_t a_ks, const float* B, int64_t ldb,
                              float acc[kGemmMR][kGemmNR]) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(),
         c11 = _mm256_setzero_ps(), c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(),
         c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps(), c40 = _mm256_setzero_ps(),
         c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  const float* a0 = A;
  const float* a1 = A + a_rs;
  const float* a2 = A + 2 * a_rs;
  const float* a3 = A + 3 * a_rs;
  const float* a4 = A + 4 * a_rs;
  const float* a5 = A + 5 * a_rs;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(B);
    const __m256 b1 = _mm256_loadu_ps(B + 8);
    B += ldb;
    __m256 a = _mm256_broadcast_ss(a0);
    c00 = _mm256_fmadd_ps(a, b0, c00);
    c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(a1);
    c10 = _mm256_fmadd_ps(a, b0, c10);
    c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(a2);
    c20 = _mm256_fmadd_ps(a, b0, c20);
    c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(a3);
    c30 = _mm256_fmadd_ps(a, b0, c30);
    c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(a4);
    c40 = _mm256_fmadd_ps(a, b0, c40);
    c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(a5);
    c50 = _mm256_fmadd_ps(a, b0, c50);
    c51 = _mm256_fmadd_ps(a, b1, c51);
    a0 += a_ks;
    a1 += a_ks;
    a2 += a_ks;
    a3 += a_ks;
    a4 += a_ks;
    a5 += a_ks;
  }
  _mm256_storeu_ps(acc[0], c00);
  _mm256_storeu_ps(acc[0] + 8, c01);
  _mm256_storeu_ps(acc[1], c10);
  _mm256_storeu_ps(acc[1] + 8, c11);
  _mm256_storeu_ps(acc[2], c20);
  _mm256_storeu_ps(acc[2] + 8, c21);
  _mm256_storeu_ps(acc[3], c30);
  _mm256_storeu_ps(acc[3] + 8, c31);
  _mm256_storeu_ps(acc[4], c40);
  _mm256_storeu_ps(acc[4] + 8, c41);
  _mm256_storeu_ps(acc[5], c50);
  _mm256_storeu_ps(acc[5] + 8, c51);
}
#endif

// The tile size of the fused depthwise-separable block's pointwise GEMM: 12 x 32 where the machine has AVX-512 (four
// times the FMAs per k of the 6 x 16 AVX2 tile, for twice the loads; its float kernel, with the block's epilogue, is
// in dsconv2d.cpp), else gemm_micro's 6 x 16. gemm_micro_wide is the tile for every other case (double; float
// without AVX-512).
#if defined(__AVX512F__)
constexpr int kWideMR = 12;
constexpr int kWideNR = 32;
#else
constexpr int kWideMR = kGemmMR;
constexpr int kWideNR = kGemmNR;
#endif

template <typename T>
inline void gemm_micro_wide(int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb,
                            T acc[kWideMR][kWideNR]) {
  if constexpr (kWideMR == kGemmMR && kWideNR == kGemmNR) {
    gemm_micro<T>(K, A, a_rs, a_ks, B, ldb, acc);  // the AVX2 float specialization where there is one
  } else {
    gemm_micro_any<kWideMR, kWideNR>(K, A, a_rs, a_ks, B, ldb, acc);
  }
}

}  // namespace cpu
}  // namespace pyvl
