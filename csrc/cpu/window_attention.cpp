// Shifted-window attention on the CPU, forward and backward.
//
// One OpenMP task is one (batch, window, head). It gathers the window's query, key and value rows straight from
// the token tensors by index arithmetic (the cyclic shift, the padding and the partition are a per-dim table
// "grid position -> token coordinate"), computes the N x N logits in a thread-private scratch that stays in L2
// (N <= 392 for Video Swin's 8x7x7), adds the relative-position bias by index (or the dense bias) and the shift
// mask by region label, takes the softmax, multiplies by V and scatters the rows back to their tokens. Only the
// window's real query tokens are computed (padding queries are dropped by the op anyway); padding keys are the
// pad_k / pad_v rows.
//
// The products Q K^T, P V (and in the backward dO V^T, P^T dO, dS K, dS^T Q) run on the 6 x 16 register-blocked
// micro-kernel; every operand is laid out in the scratch so that the micro-kernel's vector dimension is
// contiguous (K is stored transposed for Q K^T and row-major for dS K). Scratch matrices are padded to whole
// micro-kernel blocks, so a block never needs bounds checks; padded rows and columns carry finite leftovers that
// only ever reach padded outputs, since every product runs its inner dimension over valid entries only.
#include "cpu/window_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/gemm_microkernel.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PYVL_WA_AVX2 1
#endif

namespace pyvl {
namespace cpu {
namespace {

constexpr int MR = kGemmMR;
constexpr int NR = kGemmNR;
constexpr double kNormEps = 1e-12;  // F.normalize's eps

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

int thread_count() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Row primitives of the softmax: max, exp(x - shift) with its sum. Float runs on AVX2 with a Cephes-style exp
// (about 1 ulp); double (the tests' dtype) uses std::exp.

template <typename T>
T row_max(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

template <typename T>
T exp_shift(T* x, int64_t n, T shift) {
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

#ifdef PYVL_WA_AVX2
// exp(x) = 2^k exp(r), k = round(x / ln 2), r = x - k ln 2 (ln 2 split in two for exactness), exp(r) by a degree-6
// polynomial. Results below the smallest normal float are flushed to 0 (so -inf and the -100 mask give exactly 0);
// NaN propagates (MINPS/MAXPS return their second operand when either is NaN).
inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3365447504f);
  __m256 xc = _mm256_min_ps(_mm256_set1_ps(88.3762626647f), x);
  xc = _mm256_max_ps(lo, xc);
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
  const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
}

inline __m256i tail_mask(int64_t rem) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rem)), idx);
}

template <>
float row_max<float>(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float r = lanes[0];
  for (int i = 1; i < 8; ++i) r = lanes[i] > r ? lanes[i] : r;
  for (; j < n; ++j) r = x[j] > r ? x[j] : r;
  return r;
}

template <>
float exp_shift<float>(float* x, int64_t n, float shift) {
  const __m256 s = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 y = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + j), s));
    _mm256_storeu_ps(x + j, y);
    acc = _mm256_add_ps(acc, y);
  }
  if (j < n) {
    const __m256i mask = tail_mask(n - j);
    const __m256 y = _mm256_and_ps(exp256(_mm256_sub_ps(_mm256_maskload_ps(x + j, mask), s)),
                                   _mm256_castsi256_ps(mask));
    _mm256_maskstore_ps(x + j, mask, y);
    acc = _mm256_add_ps(acc, y);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}
#endif

// C = A B over whole MR x NR blocks: rows [0, round_up(M, MR)), columns [0, round_up(Nc, NR)), inner dimension
// [0, K). A(i, k) = A[i * a_rs + k * a_ks]; B is row-major with leading dimension ldb; C with ldc.
template <typename T>
void gemm(int64_t M, int64_t Nc, int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb, T* C,
          int64_t ldc) {
  alignas(32) T acc[MR][NR];
  for (int64_t i0 = 0; i0 < M; i0 += MR)
    for (int64_t j0 = 0; j0 < Nc; j0 += NR) {
      gemm_micro<T>(K, A + i0 * a_rs, a_rs, a_ks, B + j0, ldb, acc);
      for (int i = 0; i < MR; ++i) std::copy(acc[i], acc[i] + NR, C + (i0 + i) * ldc + j0);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Geometry

struct Geometry {
  int64_t N = 1;              // tokens per window
  int64_t count[3] = {};      // windows per dim
  int64_t n_windows = 1;
  int64_t table_rows = 1;     // prod(2w - 1)
  int64_t bias_center = 0;    // table row of a zero offset: idx(i, j) = bias_center + A[i] - A[j]
  std::vector<int64_t> grid_token[3];  // per dim: grid position -> token coordinate, or -1 for padding
  std::vector<int> grid_label[3];      // per dim: grid position -> shift region (0, 1, 2)
  std::vector<int64_t> table_coord;    // A[n] = sum over dims of c_n * prod(2w' - 1 over later dims)

  explicit Geometry(const WindowAttentionShape& s) {
    const int64_t sizes[3] = {s.T, s.H, s.W};
    int64_t mult[3];
    mult[2] = 1;
    mult[1] = 2 * s.window[2] - 1;
    mult[0] = mult[1] * (2 * s.window[1] - 1);
    table_rows = mult[0] * (2 * s.window[0] - 1);
    for (int dim = 0; dim < 3; ++dim) {
      const int64_t S = sizes[dim], w = s.window[dim], sh = s.shift[dim];
      const int64_t Sp = round_up(S, w);
      count[dim] = Sp / w;
      n_windows *= count[dim];
      N *= w;
      bias_center += (w - 1) * mult[dim];
      grid_token[dim].resize(Sp);
      grid_label[dim].resize(Sp);
      for (int64_t r = 0; r < Sp; ++r) {
        if (s.pad_first) {
          const int64_t p = (r + sh) % Sp;
          grid_token[dim][r] = p < S ? p : -1;
        } else {
          grid_token[dim][r] = r < S ? (r + sh) % S : -1;
        }
        grid_label[dim][r] = sh == 0 ? 0 : (r < Sp - w ? 0 : (r < Sp - sh ? 1 : 2));
      }
    }
    table_coord.resize(N);
    for (int64_t c0 = 0, n = 0; c0 < s.window[0]; ++c0)
      for (int64_t c1 = 0; c1 < s.window[1]; ++c1)
        for (int64_t c2 = 0; c2 < s.window[2]; ++c2, ++n) table_coord[n] = c0 * mult[0] + c1 * mult[1] + c2;
  }
};

// The tokens of one window of one batch item.
struct WindowTokens {
  std::vector<int64_t> coord;  // [N][3] token coordinates (t, h, w); unused for padding positions
  std::vector<int64_t> token;  // [N] linear token index (b, t, h, w) in a contiguous tensor, or -1 for padding
  std::vector<int> label;      // [N] shift region label
  std::vector<int> rows;       // window positions of the real tokens (the queries computed)
  bool masked = false;         // some pair of positions has different labels

  explicit WindowTokens(int64_t N) : coord(3 * N), token(N), label(N) { rows.reserve(N); }

  void build(const Geometry& g, const WindowAttentionShape& s, int64_t b, int64_t win) {
    const int64_t wi[3] = {win / (g.count[1] * g.count[2]), win / g.count[2] % g.count[1], win % g.count[2]};
    rows.clear();
    masked = false;
    int64_t n = 0;
    for (int64_t c0 = 0; c0 < s.window[0]; ++c0) {
      const int64_t r0 = wi[0] * s.window[0] + c0;
      for (int64_t c1 = 0; c1 < s.window[1]; ++c1) {
        const int64_t r1 = wi[1] * s.window[1] + c1;
        for (int64_t c2 = 0; c2 < s.window[2]; ++c2, ++n) {
          const int64_t r2 = wi[2] * s.window[2] + c2;
          const int64_t t0 = g.grid_token[0][r0], t1 = g.grid_token[1][r1], t2 = g.grid_token[2][r2];
          label[n] = g.grid_label[0][r0] * 9 + g.grid_label[1][r1] * 3 + g.grid_label[2][r2];
          masked = masked || label[n] != label[0];
          if (t0 < 0 || t1 < 0 || t2 < 0) {
            token[n] = -1;
            continue;
          }
          coord[3 * n] = t0;
          coord[3 * n + 1] = t1;
          coord[3 * n + 2] = t2;
          token[n] = ((b * s.T + t0) * s.H + t1) * s.W + t2;
          rows.push_back(static_cast<int>(n));
        }
      }
    }
  }

  template <typename T>
  const T* at(const T* base, const TokenStrides& st, int64_t b, int64_t n, int64_t head) const {
    const int64_t* c = &coord[3 * n];
    return base + b * st.b + c[0] * st.t + c[1] * st.h + c[2] * st.w + head * st.head;
  }
};

// Per-call values shared by the tasks: the bias table per head reversed (so a row of bias values is read at
// increasing offsets), tau per head, the geometry.
template <typename T>
struct Problem {
  const WindowAttentionShape& s;
  const WindowAttentionInputs<T>& in;
  Geometry g;
  int64_t N, Np, Mp, dp;
  std::vector<T> rev_table;  // [heads][rows]: rev_table[h][x] = table[rows - 1 - x][h]
  std::vector<T> tau;        // [heads]

  Problem(const WindowAttentionShape& s_, const WindowAttentionInputs<T>& in_) : s(s_), in(in_), g(s_) {
    N = g.N;
    Mp = round_up(N, MR);
    Np = round_up(Mp, NR);  // >= round_up(N, NR) and >= round_up(N, MR): room for P^T and dS^T as A operands
    dp = round_up(s.d, NR);
    const int64_t rows = g.table_rows, heads = s.heads;
    if (in.rel_bias_table) {
      rev_table.resize(heads * rows);
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t x = 0; x < rows; ++x) rev_table[h * rows + x] = in.rel_bias_table[(rows - 1 - x) * heads + h];
    }
    if (in.logit_scale) {
      tau.resize(heads);
      const T cap = static_cast<T>(std::log(100.0));
      for (int64_t h = 0; h < heads; ++h) tau[h] = std::exp(std::min(in.logit_scale[h], cap));
    }
  }

  int64_t tasks() const { return s.B * g.n_windows * s.heads; }

  // Row m of the (query-compacted) logits of window `w`, head h, from the raw products: cosine scale, bias, mask.
  void finish_logits(T* row, const WindowTokens& w, int m, int64_t h) const {
    const int n_i = w.rows[m];
    if (in.logit_scale) {
      const T t = tau[h];
      for (int64_t j = 0; j < N; ++j) row[j] *= t;
    }
    if (in.rel_bias_table) {
      // rev_table[h][rows - 1 - (center + A_i - A_j)] = rev_table[h][(center - A_i) + A_j] (rows - 1 = 2 center)
      const T* rb = rev_table.data() + h * g.table_rows + (g.bias_center - g.table_coord[n_i]);
      const int64_t* A = g.table_coord.data();
      for (int64_t j = 0; j < N; ++j) row[j] += rb[A[j]];
    } else if (in.rel_bias) {
      const T* db = in.rel_bias + (h * N + n_i) * N;
      for (int64_t j = 0; j < N; ++j) row[j] += db[j];
    }
    if (w.masked) {
      const T mv = static_cast<T>(s.mask_value);
      const int li = w.label[n_i];
      const int* lab = w.label.data();
      for (int64_t j = 0; j < N; ++j) row[j] += lab[j] != li ? mv : T(0);
    }
  }
};

// Loads one q/k row: scaled by `scale` for dot-product attention, or normalized for cosine attention (then the
// row's norm is returned for the backward).
template <typename T>
T load_row(const T* src, int64_t d, bool cosine, T scale, T* dst) {
  if (!cosine) {
    for (int64_t c = 0; c < d; ++c) dst[c] = src[c] * scale;
    return T(0);
  }
  T ss = 0;
  for (int64_t c = 0; c < d; ++c) ss += src[c] * src[c];
  const T norm = std::sqrt(ss);
  const T denom = std::max(norm, static_cast<T>(kNormEps));
  for (int64_t c = 0; c < d; ++c) dst[c] = src[c] / denom;
  return norm;
}

// d(x / max(|x|, eps)) / dx applied to g, given xh = the normalized row and the norm of x (torch.clamp_min passes
// the gradient where norm >= eps).
template <typename T>
void normalize_backward(const T* xh, T norm, const T* g, int64_t d, T* dx) {
  if (norm >= static_cast<T>(kNormEps)) {
    T dot = 0;
    for (int64_t c = 0; c < d; ++c) dot += xh[c] * g[c];
    const T inv = T(1) / norm;
    for (int64_t c = 0; c < d; ++c) dx[c] = (g[c] - xh[c] * dot) * inv;
  } else {
    const T inv = static_cast<T>(1.0 / kNormEps);
    for (int64_t c = 0; c < d; ++c) dx[c] = g[c] * inv;
  }
}

// Key and value rows of one window and head: real tokens from k / v, padding positions from pad_k / pad_v (or 0).
template <typename T>
const T* key_row(const Problem<T>& P, const WindowTokens& w, int64_t b, int64_t n, int64_t h, const T* zeros) {
  if (w.token[n] >= 0) return w.at(P.in.k, P.in.k_strides, b, n, h);
  return P.in.pad_k ? P.in.pad_k + h * P.s.d : zeros;
}

template <typename T>
const T* value_row(const Problem<T>& P, const WindowTokens& w, int64_t b, int64_t n, int64_t h, const T* zeros) {
  if (w.token[n] >= 0) return w.at(P.in.v, P.in.v_strides, b, n, h);
  return P.in.pad_v ? P.in.pad_v + h * P.s.d : zeros;
}

}  // namespace

template <typename T>
void window_attention_forward(const WindowAttentionShape& s, const WindowAttentionInputs<T>& in, T* out, T* lse) {
  const Problem<T> P(s, in);
  const int64_t N = P.N, Np = P.Np, Mp = P.Mp, dp = P.dp, d = s.d, heads = s.heads;
  const bool cosine = in.logit_scale != nullptr;
  const T scale = static_cast<T>(s.scale);
  const int64_t tasks = P.tasks();
#pragma omp parallel
  {
    std::vector<T> Q(Mp * dp), KT(dp * Np), V(Np * dp), S(Mp * Np), O(Mp * dp), zeros(d), krow(d);
    WindowTokens w(N);
    int64_t built = -1;  // the (batch, window) whose tokens `w` holds; tasks run heads innermost
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t h = task % heads, bw = task / heads;
      const int64_t b = bw / P.g.n_windows, win = bw % P.g.n_windows;
      if (bw != built) {
        w.build(P.g, s, b, win);
        built = bw;
      }
      const int M = static_cast<int>(w.rows.size());
      if (M == 0) continue;
      for (int m = 0; m < M; ++m) load_row(w.at(in.q, in.q_strides, b, w.rows[m], h), d, cosine, scale, &Q[m * dp]);
      for (int64_t n = 0; n < N; ++n) {
        load_row(key_row(P, w, b, n, h, zeros.data()), d, cosine, T(1), krow.data());
        for (int64_t c = 0; c < d; ++c) KT[c * Np + n] = krow[c];
        const T* vr = value_row(P, w, b, n, h, zeros.data());
        std::copy(vr, vr + d, &V[n * dp]);
      }
      gemm<T>(M, N, d, Q.data(), dp, 1, KT.data(), Np, S.data(), Np);
      for (int m = 0; m < M; ++m) {
        T* row = &S[m * Np];
        P.finish_logits(row, w, m, h);
        const T mx = row_max(row, N);
        const T sum = exp_shift(row, N, mx);
        const T inv = T(1) / sum;
        for (int64_t j = 0; j < N; ++j) row[j] *= inv;
        lse[w.token[w.rows[m]] * heads + h] = mx + std::log(sum);
      }
      gemm<T>(M, d, N, S.data(), Np, 1, V.data(), dp, O.data(), dp);
      for (int m = 0; m < M; ++m) std::copy(&O[m * dp], &O[m * dp] + d, out + (w.token[w.rows[m]] * heads + h) * d);
    }
  }
}

template <typename T>
void window_attention_backward(const WindowAttentionShape& s, const WindowAttentionInputs<T>& in, const T* grad_out,
                               const TokenStrides& grad_out_strides, const T* out, const TokenStrides& out_strides,
                               const T* lse, const WindowAttentionGrads<T>& grads) {
  const Problem<T> P(s, in);
  const int64_t N = P.N, Np = P.Np, Mp = P.Mp, dp = P.dp, d = s.d, heads = s.heads;
  const int64_t rows = P.g.table_rows;
  const bool cosine = in.logit_scale != nullptr;
  const T scale = static_cast<T>(s.scale);
  const int64_t tasks = P.tasks();
  const bool need_table = grads.d_rel_bias_table && in.rel_bias_table;
  const bool need_bias = grads.d_rel_bias && in.rel_bias;
  const bool need_tau = grads.d_logit_scale && cosine;
  const bool need_pk = grads.d_pad_k != nullptr, need_pv = grads.d_pad_v != nullptr;
  const bool need_dq = grads.dq || need_tau;
  const bool need_dk = grads.dk || need_pk;
  const bool need_dv = grads.dv || need_pv;

  // Sums over windows, one partial per thread (double), reduced in thread order after the parallel region.
  const int64_t partial_size = (need_table ? heads * rows : 0) + (need_bias ? heads * N * N : 0) +
                               (need_tau ? heads : 0) + (need_pk ? heads * d : 0) + (need_pv ? heads * d : 0);
  const int nthreads = thread_count();
  std::vector<std::vector<double>> partials(nthreads);
#pragma omp parallel
  {
    std::vector<double>& acc = partials[thread_id()];
    acc.assign(partial_size, 0.0);
    double* acc_table = acc.data();
    double* acc_bias = acc_table + (need_table ? heads * rows : 0);
    double* acc_tau = acc_bias + (need_bias ? heads * N * N : 0);
    double* acc_pk = acc_tau + (need_tau ? heads : 0);
    double* acc_pv = acc_pk + (need_pk ? heads * d : 0);

    std::vector<T> Q(Mp * dp), KT(dp * Np), K(Np * dp), VT(dp * Np), dO(Mp * dp), S(Mp * Np), dS(Mp * Np),
        G(Mp * dp), dK(Np * dp), dV(Np * dp), D(Mp), qnorm(Mp), knorm(Np), zeros(d), tmp(d);
    WindowTokens w(N);
    int64_t built = -1;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t h = task % heads, bw = task / heads;
      const int64_t b = bw / P.g.n_windows, win = bw % P.g.n_windows;
      if (bw != built) {
        w.build(P.g, s, b, win);
        built = bw;
      }
      const int M = static_cast<int>(w.rows.size());
      if (M == 0) continue;
      for (int m = 0; m < M; ++m) {
        const int n = w.rows[m];
        qnorm[m] = load_row(w.at(in.q, in.q_strides, b, n, h), d, cosine, scale, &Q[m * dp]);
        const T* go = w.at(grad_out, grad_out_strides, b, n, h);
        const T* o = w.at(out, out_strides, b, n, h);
        T dot = 0;
        for (int64_t c = 0; c < d; ++c) {
          dO[m * dp + c] = go[c];
          dot += go[c] * o[c];
        }
        D[m] = dot;
      }
      for (int64_t n = 0; n < N; ++n) {
        T* kr = &K[n * dp];
        knorm[n] = load_row(key_row(P, w, b, n, h, zeros.data()), d, cosine, T(1), kr);
        const T* vr = value_row(P, w, b, n, h, zeros.data());
        for (int64_t c = 0; c < d; ++c) {
          KT[c * Np + n] = kr[c];
          VT[c * Np + n] = vr[c];
        }
      }
      // P = exp(logits - lse); dS = P * (dO V^T - rowsum(dO * O)).
      gemm<T>(M, N, d, Q.data(), dp, 1, KT.data(), Np, S.data(), Np);
      gemm<T>(M, N, d, dO.data(), dp, 1, VT.data(), Np, dS.data(), Np);
      for (int m = 0; m < M; ++m) {
        T* p = &S[m * Np];
        T* ds = &dS[m * Np];
        P.finish_logits(p, w, m, h);
        exp_shift(p, N, lse[w.token[w.rows[m]] * heads + h]);
        const T Dm = D[m];
        for (int64_t j = 0; j < N; ++j) ds[j] = p[j] * (ds[j] - Dm);
        if (need_table) {
          double* dt = acc_table + h * rows + (P.g.bias_center - P.g.table_coord[w.rows[m]]);
          const int64_t* A = P.g.table_coord.data();
          for (int64_t j = 0; j < N; ++j) dt[A[j]] += ds[j];
        }
        if (need_bias) {
          double* db = acc_bias + (h * N + w.rows[m]) * N;
          for (int64_t j = 0; j < N; ++j) db[j] += ds[j];
        }
      }
      if (need_dv) {
        gemm<T>(N, d, M, S.data(), 1, Np, dO.data(), dp, dV.data(), dp);  // P^T dO
        for (int64_t n = 0; n < N; ++n) {
          const T* src = &dV[n * dp];
          if (w.token[n] >= 0) {
            if (grads.dv) std::copy(src, src + d, grads.dv + (w.token[n] * heads + h) * d);
          } else if (need_pv) {
            for (int64_t c = 0; c < d; ++c) acc_pv[h * d + c] += src[c];
          }
        }
      }
      if (need_dk) {
        gemm<T>(N, d, M, dS.data(), 1, Np, Q.data(), dp, dK.data(), dp);  // dS^T Q (Q already scaled)
        for (int64_t n = 0; n < N; ++n) {
          T* g = &dK[n * dp];
          if (cosine) {
            for (int64_t c = 0; c < d; ++c) g[c] *= P.tau[h];
            normalize_backward(&K[n * dp], knorm[n], g, d, tmp.data());
            std::copy(tmp.begin(), tmp.end(), g);
          }
          if (w.token[n] >= 0) {
            if (grads.dk) std::copy(g, g + d, grads.dk + (w.token[n] * heads + h) * d);
          } else if (need_pk) {
            for (int64_t c = 0; c < d; ++c) acc_pk[h * d + c] += g[c];
          }
        }
      }
      if (need_dq) {
        gemm<T>(M, d, N, dS.data(), Np, 1, K.data(), dp, G.data(), dp);  // dS K
        for (int m = 0; m < M; ++m) {
          T* g = &G[m * dp];
          T* dst = grads.dq ? grads.dq + (w.token[w.rows[m]] * heads + h) * d : tmp.data();
          if (cosine) {
            const T* qh = &Q[m * dp];
            if (need_tau) {
              T dot = 0;
              for (int64_t c = 0; c < d; ++c) dot += qh[c] * g[c];
              acc_tau[h] += dot;
            }
            for (int64_t c = 0; c < d; ++c) g[c] *= P.tau[h];
            normalize_backward(qh, qnorm[m], g, d, dst);
          } else {
            for (int64_t c = 0; c < d; ++c) dst[c] = g[c] * scale;
          }
        }
      }
    }
  }

  // Reduce the partials in thread order.
  auto reduce = [&](int64_t offset, int64_t count, auto&& store) {
    for (int64_t i = 0; i < count; ++i) {
      double sum = 0;
      for (const auto& part : partials)
        if (!part.empty()) sum += part[offset + i];
      store(i, sum);
    }
  };
  int64_t offset = 0;
  if (need_table) {
    reduce(offset, heads * rows, [&](int64_t i, double v) {
      const int64_t h = i / rows, x = i % rows;
      grads.d_rel_bias_table[(rows - 1 - x) * heads + h] = static_cast<T>(v);
    });
    offset += heads * rows;
  }
  if (need_bias) {
    reduce(offset, heads * N * N, [&](int64_t i, double v) { grads.d_rel_bias[i] = static_cast<T>(v); });
    offset += heads * N * N;
  }
  if (need_tau) {
    const double cap = std::log(100.0);
    reduce(offset, heads, [&](int64_t h, double v) {
      // d tau / d logit_scale = tau where logit_scale is below the clamp (torch.clamp's gradient), else 0.
      const bool passes = static_cast<double>(in.logit_scale[h]) <= static_cast<double>(static_cast<T>(cap));
      grads.d_logit_scale[h] = passes ? static_cast<T>(v * static_cast<double>(P.tau[h])) : T(0);
    });
    offset += heads;
  }
  if (need_pk) {
    reduce(offset, heads * d, [&](int64_t i, double v) { grads.d_pad_k[i] = static_cast<T>(v); });
    offset += heads * d;
  }
  if (need_pv) reduce(offset, heads * d, [&](int64_t i, double v) { grads.d_pad_v[i] = static_cast<T>(v); });
}

template void window_attention_forward<float>(const WindowAttentionShape&, const WindowAttentionInputs<float>&,
                                              float*, float*);
template void window_attention_forward<double>(const WindowAttentionShape&, const WindowAttentionInputs<double>&,
                                               double*, double*);
template void window_attention_backward<float>(const WindowAttentionShape&, const WindowAttentionInputs<float>&,
                                               const float*, const TokenStrides&, const float*, const TokenStrides&,
                                               const float*, const WindowAttentionGrads<float>&);
template void window_attention_backward<double>(const WindowAttentionShape&, const WindowAttentionInputs<double>&,
                                                const double*, const TokenStrides&, const double*,
                                                const TokenStrides&, const double*, const WindowAttentionGrads<double>&);

}  // namespace cpu
}  // namespace pyvl
