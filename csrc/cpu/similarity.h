// Batched similarity logits, and the tiled dot products that the contrastive loss shares with them.
//
//   out[b, i, j] = scale * <a[b, i], b[b, j]> * ra[b, i] * rb[b, j] + bias
//
// with ra, rb = 1 / max(||row||, eps) when normalizing (F.normalize's semantics) and 1 otherwise. The norms are
// folded into the epilogue of a blocked GEMM, so the normalized rows are never written anywhere.
//
// The GEMM: b's rows are packed once into panels of kSimNR columns ([d][kSimNR], zero beyond the last row),
// and a tile of kSimBlock x kSimBlock dot products is computed by the wide register-blocked micro-kernel in
// gemm_microkernel.h (12 x 32 under AVX-512, else 6 x 16), reading a's rows in place (a tail of fewer than kSimMR
// rows is copied into a zero-padded scratch first).
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/gemm_microkernel.h"

namespace pyvl {
namespace cpu {

// The micro-tile: gemm_micro_wide's.
constexpr int64_t kSimMR = kWideMR;
constexpr int64_t kSimNR = kWideNR;

// Rows and columns of one tile: a multiple of both kSimMR (6 or 12) and kSimNR (16 or 32), so that tiles tile the
// micro-kernel exactly; 96 x 96 floats is 36 KiB of logits, and 96 rows of d = 768 is 288 KiB of a: one tile's
// working set stays in a 512 KiB L2.
constexpr int64_t kSimBlock = 96;
static_assert(kSimBlock % kSimMR == 0 && kSimBlock % kSimNR == 0, "tiles must hold whole micro-tiles");

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// panels[p][k][c] = b[(p * kSimNR + c) * ldb + k] for rows < M, else 0. panels holds round_up(M, kSimNR) * d values.
template <typename T>
void pack_panels(const T* b, int64_t M, int64_t d, int64_t ldb, T* panels) {
  const int64_t P = round_up(M, kSimNR) / kSimNR;
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < P; ++p) pack_panel(b, M, d, ldb, kSimNR, p, panels + p * d * kSimNR);
}

// tile[i * kSimBlock + j] = <a_i, b_{j0 + j}> for i < rows, j < round_up(cols, kSimNR) (columns past the last row
// of b read zero panels and give 0). a: rows of length d with row stride lda. scratch: kSimMR * d values.
template <typename T>
void dot_tile(const T* a, int64_t lda, int64_t rows, const T* panels, int64_t d, int64_t j0, int64_t cols, T* tile,
              T* scratch) {
  T acc[kSimMR][kSimNR];
  const int64_t p0 = j0 / kSimNR;
  const int64_t np = round_up(cols, kSimNR) / kSimNR;
  for (int64_t r0 = 0; r0 < rows; r0 += kSimMR) {
    const T* ar = a + r0 * lda;
    int64_t rs = lda;
    if (r0 + kSimMR > rows) {  // the micro-kernel reads kSimMR rows: give the tail zero rows to read
      const int64_t valid = rows - r0;
      std::memset(scratch, 0, sizeof(T) * kSimMR * d);
      for (int64_t r = 0; r < valid; ++r) std::memcpy(scratch + r * d, ar + r * lda, sizeof(T) * d);
      ar = scratch;
      rs = d;
    }
    for (int64_t p = 0; p < np; ++p) {
      gemm_micro_wide<T>(d, ar, rs, 1, panels + (p0 + p) * d * kSimNR, kSimNR, acc);
      for (int r = 0; r < kSimMR; ++r)
        for (int c = 0; c < kSimNR; ++c) tile[(r0 + r) * kSimBlock + p * kSimNR + c] = acc[r][c];
    }
  }
}

// C[r, c] += alpha * sum_k A(r, k) * B[k * ldb + c] for r < rows, c < ncols, with A(r, k) = A[r * a_rs + k * a_ks].
// rows may be any count <= the rows A can be read at in groups of kSimMR (the caller pads A); B is read only for
// c < ncols (the columns past the last multiple of kSimNR take a scalar loop).
template <typename T>
void gemm_accumulate(int64_t rows, int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb,
                     int64_t ncols, T alpha, T* C, int64_t ldc) {
  T acc[kSimMR][kSimNR];
  const int64_t full = ncols / kSimNR * kSimNR;
  for (int64_t r0 = 0; r0 < rows; r0 += kSimMR) {
    const int64_t valid = rows - r0 < kSimMR ? rows - r0 : kSimMR;
    for (int64_t c0 = 0; c0 < full; c0 += kSimNR) {
      gemm_micro_wide<T>(K, A + r0 * a_rs, a_rs, a_ks, B + c0, ldb, acc);
      for (int64_t r = 0; r < valid; ++r) {
        T* out = C + (r0 + r) * ldc + c0;
        for (int c = 0; c < kSimNR; ++c) out[c] += alpha * acc[r][c];
      }
    }
    for (int64_t r = 0; r < valid; ++r) {
      T* out = C + (r0 + r) * ldc;
      for (int64_t c = full; c < ncols; ++c) {
        T s = 0;
        for (int64_t k = 0; k < K; ++k) s += A[(r0 + r) * a_rs + k * a_ks] * B[k * ldb + c];
        out[c] += alpha * s;
      }
    }
  }
}

// out: [B, N, M] contiguous. a, b: B batches of N (M) rows of d contiguous values, batch b at a + b * a_bs
// (a_bs or b_bs may be 0: a batch broadcast against the other's). eps is F.normalize's (1e-12).
template <typename T>
void similarity_logits_forward(const T* a, const T* b, T* out, int64_t B, int64_t N, int64_t M, int64_t d,
                               int64_t a_bs, int64_t b_bs, T scale, T bias, bool normalize, double eps);

}  // namespace cpu
}  // namespace pyvl
