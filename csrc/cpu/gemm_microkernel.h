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

// The wide tile, for the fused depthwise-separable block's pointwise GEMM and the similarity / contrastive tiles:
// 12 x 32 floats where the machine has AVX-512 (24 zmm accumulators + 2 for B + 1 broadcast, of 32 registers: four
// times the FMAs per k of the 6 x 16 AVX2 tile, for twice the loads), else gemm_micro's 6 x 16. (dsconv2d.cpp has
// its own AVX-512 float tile, with the block's epilogue on the registers.)
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

#if defined(__AVX512F__)
// The wide tile's k-loop on accumulators the caller owns: c[i][h] += sum_k A(i, k) * B[k * ldb + 16 h ..][0:16].
// Shared by gemm_micro_wide<float> and dsconv2d.cpp's tile, which differ only in how c starts and ends.
__attribute__((always_inline)) inline void wide_kloop(int64_t K, const float* A, int64_t a_rs, int64_t a_ks,
                                                      const float* B, int64_t ldb, __m512 (&c)[kWideMR][2]) {
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_loadu_ps(B);
    const __m512 b1 = _mm512_loadu_ps(B + 16);
    B += ldb;
#pragma GCC unroll 12
    for (int i = 0; i < kWideMR; ++i) {
      const __m512 a = _mm512_set1_ps(A[i * a_rs]);
      c[i][0] = _mm512_fmadd_ps(a, b0, c[i][0]);
      c[i][1] = _mm512_fmadd_ps(a, b1, c[i][1]);
    }
    A += a_ks;
  }
}

template <>
inline void gemm_micro_wide<float>(int64_t K, const float* A, int64_t a_rs, int64_t a_ks, const float* B, int64_t ldb,
                                   float acc[kWideMR][kWideNR]) {
  __m512 c[kWideMR][2];
#pragma GCC unroll 12
  for (int i = 0; i < kWideMR; ++i) c[i][0] = c[i][1] = _mm512_setzero_ps();
  wide_kloop(K, A, a_rs, a_ks, B, ldb, c);
#pragma GCC unroll 12
  for (int i = 0; i < kWideMR; ++i) {
    _mm512_storeu_ps(acc[i], c[i][0]);
    _mm512_storeu_ps(acc[i] + 16, c[i][1]);
  }
}
#endif

// Panel p, of width w, of the rows of b (M rows of d values, row stride ldb) in the order the micro-kernels read B:
// out[k * w + c] = b[(p * w + c) * ldb + k] for rows p * w + c < M, else 0 (out holds d * w values).
template <typename T>
inline void pack_panel(const T* b, int64_t M, int64_t d, int64_t ldb, int64_t w, int64_t p, T* out) {
  for (int64_t c = 0; c < w; ++c) {
    const int64_t j = p * w + c;
    if (j < M) {
      const T* row = b + j * ldb;
      for (int64_t k = 0; k < d; ++k) out[k * w + c] = row[k];
    } else {
      for (int64_t k = 0; k < d; ++k) out[k * w + c] = T(0);
    }
  }
}

}  // namespace cpu
}  // namespace pyvl
