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
// The products Q K^T, P V (and in the backward dO V^T, P^T dO, dS K, dS^T Q) run on register-blocked
// micro-kernels (up to 6 rows x 16 columns of FMA accumulators, with row and column tails of their own so that a
// 49-token window wastes little); every operand is laid out in the scratch so that the vector dimension is
// contiguous (K is stored transposed for Q K^T and row-major for dS K). The softmax runs on whole 8-wide vectors
// with an AVX2 exp, its padding columns set to -inf. Measured choices: the window's rows are gathered without
// software prefetch of the current window (no measurable difference), but with a prefetch of the next window's
// rows (WindowPrefetcher).
#include "cpu/window_attention.h"
#include "cpu/simd.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PYVL_WA_AVX2 1
#endif

namespace pyvl {
namespace cpu {
namespace {

constexpr int NR = 16;  // scratch rows are padded to whole 16-column register blocks
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
// Row primitives of the softmax over whole 8-wide vectors: a logits row is padded with -inf to a multiple of 8
// (its scratch row has room up to Np), so no masked loads or stores are needed (VMASKMOVPS stores are microcoded
// on AMD). Float runs on AVX2 (16 lanes under AVX-512) with a Cephes-style exp (about 1 ulp); double (the tests'
// dtype) uses std::exp.

constexpr int kVec = 8;

// Rows m < M of x (leading dimension ld, n columns): x = exp(x - shift[m]); sums[m] = the row's sum if sums.
template <typename T>
void exp_rows(T* x, int64_t ld, int M, int64_t n, const T* shift, T* sums) {
  for (int m = 0; m < M; ++m) {
    T* row = x + m * ld;
    T sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      row[j] = std::exp(row[j] - shift[m]);
      sum += row[j];
    }
    if (sums) sums[m] = sum;
  }
}

template <typename T>
void copy_row(const T* src, int64_t n, T* dst) {
  std::copy(src, src + n, dst);
}

template <typename T>
void scale_row(const T* src, int64_t n, T f, T* dst) {
  for (int64_t c = 0; c < n; ++c) dst[c] = src[c] * f;
}

#ifdef PYVL_WA_AVX2

// Two rows at a time, so that two independent exp chains fill the pipelines (a row is only a few vectors long
// and one exp is a long dependent chain); the build's widest vectors (16 lanes under AVX-512), then one 8-lane step
// (n is a multiple of 8, the padded row length). Against 8 lanes throughout, on a 2-core AMD EPYC Zen 5 (AVX-512;
// fastest of 15 calls, 2-3 interleaved rounds, shifted windows with a bias table, d 32): forward 1.04-1.10x at
// Swin-T stage 1 (2 x 56 x 56, 3 heads) and Video Swin-T stage 1 (8 x 56 x 56, windows 8 x 7 x 7), forward +
// backward 1.08-1.13x.
template <>
void exp_rows<float>(float* x, int64_t ld, int M, int64_t n, const float* shift, float* sums) {
  for (int m = 0; m < M; m += 2) {
    float* r0 = x + m * ld;
    float* r1 = m + 1 < M ? r0 + ld : nullptr;
    const float s0 = shift[m], s1 = r1 ? shift[m + 1] : 0.f;
    float sum0 = 0, sum1 = 0;
    int64_t j = simd::exp_shifted_rows<simd::F32xW>(r0, r1, s0, s1, 0, n, sum0, sum1);
    if (j < n) simd::exp_shifted_rows<simd::F32x8>(r0, r1, s0, s1, j, n, sum0, sum1);
    if (sums) {
      sums[m] = sum0;
      if (r1) sums[m + 1] = sum1;
    }
  }
}

// Explicit vectors: a plain loop would become a memmove call, which costs more than copying one short row.
template <>
void copy_row<float>(const float* src, int64_t n, float* dst) {
  int64_t c = 0;
  for (; c + kVec <= n; c += kVec) _mm256_storeu_ps(dst + c, _mm256_loadu_ps(src + c));
  for (; c < n; ++c) dst[c] = src[c];
}
#endif

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T sum = 0;
  for (int64_t c = 0; c < n; ++c) sum += a[c] * b[c];
  return sum;
}

// The logits row of one query from its raw products: row[j] = row[j] * t (cosine attention; t = 1 otherwise)
// + bias[j] (if given) + mask_value where lab[j] != li (if lab is given), for j < n; -inf in [n, nv). Returns the
// row's max. bias and lab are readable up to nv.
template <typename T>
T finish_row(T* row, int64_t n, int64_t nv, T t, const T* bias, const int* lab, int li, T mv) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    T x = row[j] * t;
    if (bias) x += bias[j];
    if (lab) x += lab[j] != li ? mv : T(0);
    row[j] = x;
    mx = x > mx ? x : mx;
  }
  for (int64_t j = n; j < nv; ++j) row[j] = -std::numeric_limits<T>::infinity();
  return mx;
}

#ifdef PYVL_WA_AVX2
template <>
float dot<float>(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + kVec <= n; c += kVec) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), acc);
  float sum = simd::F32x8::sum(acc);
  for (; c < n; ++c) sum += a[c] * b[c];
  return sum;
}

template <>
float finish_row<float>(float* row, int64_t n, int64_t nv, float t, const float* bias, const int* lab, int li,
                        float mv) {
  const __m256 vt = _mm256_set1_ps(t), vmv = _mm256_set1_ps(mv), ninf = _mm256_set1_ps(-INFINITY);
  const __m256i vli = _mm256_set1_epi32(li);
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 mx = ninf;
  for (int64_t j = 0; j < nv; j += kVec) {
    __m256 x = _mm256_mul_ps(_mm256_loadu_ps(row + j), vt);
    if (bias) x = _mm256_add_ps(x, _mm256_loadu_ps(bias + j));
    if (lab) {
      const __m256i same = _mm256_cmpeq_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lab + j)), vli);
      x = _mm256_add_ps(x, _mm256_andnot_ps(_mm256_castsi256_ps(same), vmv));
    }
    if (j + kVec > n) {
      const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - j)), idx);
      x = _mm256_blendv_ps(ninf, x, _mm256_castsi256_ps(valid));
    }
    _mm256_storeu_ps(row + j, x);
    mx = _mm256_max_ps(mx, x);
  }
  alignas(32) float l[8];
  _mm256_store_ps(l, mx);
  float r = l[0];
  for (int i = 1; i < 8; ++i) r = l[i] > r ? l[i] : r;
  return r;
}
#endif

// ---------------------------------------------------------------------------------------------------------------
// Small GEMMs: C = A B with A(i, k) = A[i * a_rs + k * a_ks] (row-major, or transposed with a_rs = 1), B row-major
// with leading dimension ldb, C with ldc. A register block is R rows (R <= 6, the last block of a matrix takes the
// rows that are left, so a 49-row window does 8 blocks of 6 and one of 1) by 16 or 8 columns; C is stored
// straight from the registers. Columns are computed (and B read) in whole 8-wide vectors: C and B need room up to
// round_up(Nc, 16) columns; those past Nc hold leftovers.

template <int R, int V, typename T>
inline void micro_generic(int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb, T* C,
                          int64_t ldc) {
  constexpr int W = V * kVec;
  T c[R][W] = {};
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    for (int r = 0; r < R; ++r) {
      const T a = A[r * a_rs + k * a_ks];
      for (int j = 0; j < W; ++j) c[r][j] += a * b[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < W; ++j) C[r * ldc + j] = c[r][j];
}

template <int R, int V>
inline void micro(int64_t K, const double* A, int64_t a_rs, int64_t a_ks, const double* B, int64_t ldb, double* C,
                  int64_t ldc) {
  micro_generic<R, V>(K, A, a_rs, a_ks, B, ldb, C, ldc);
}

template <int R, int V>
inline void micro(int64_t K, const float* A, int64_t a_rs, int64_t a_ks, const float* B, int64_t ldb, float* C,
                  int64_t ldc) {
#ifdef PYVL_WA_AVX2
  // R x V accumulators + V loads of B + 1 broadcast: at most 12 + 2 + 1 of the 16 ymm registers.
  __m256 c[R][V];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) c[r][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 b[V];
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) b[v] = _mm256_loadu_ps(B + k * ldb + v * kVec);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * a_rs + k * a_ks);
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) c[r][v] = _mm256_fmadd_ps(a, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(C + r * ldc + v * kVec, c[r][v]);
#else
  micro_generic<R, V>(K, A, a_rs, a_ks, B, ldb, C, ldc);
#endif
}

template <int V, typename T>
inline void micro_rows(int R, int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb, T* C,
                       int64_t ldc) {
  switch (R) {
    case 6: micro<6, V>(K, A, a_rs, a_ks, B, ldb, C, ldc); break;
    case 5: micro<5, V>(K, A, a_rs, a_ks, B, ldb, C, ldc); break;
    case 4: micro<4, V>(K, A, a_rs, a_ks, B, ldb, C, ldc); break;
    case 3: micro<3, V>(K, A, a_rs, a_ks, B, ldb, C, ldc); break;
    case 2: micro<2, V>(K, A, a_rs, a_ks, B, ldb, C, ldc); break;
    default: micro<1, V>(K, A, a_rs, a_ks, B, ldb, C, ldc); break;
  }
}

template <typename T>
void gemm(int64_t M, int64_t Nc, int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb, T* C,
          int64_t ldc) {
  constexpr int64_t MR = 6;
  for (int64_t i0 = 0; i0 < M; i0 += MR) {
    const int R = static_cast<int>(std::min(MR, M - i0));
    for (int64_t j0 = 0; j0 < Nc; j0 += 2 * kVec) {
      if (Nc - j0 > kVec)
        micro_rows<2>(R, K, A + i0 * a_rs, a_rs, a_ks, B + j0, ldb, C + i0 * ldc + j0, ldc);
      else
        micro_rows<1>(R, K, A + i0 * a_rs, a_rs, a_ks, B + j0, ldb, C + i0 * ldc + j0, ldc);
    }
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
  std::vector<int> label;      // [N] shift region label (+ kVec of padding for 8-wide reads)
  std::vector<int> rows;       // window positions of the real tokens (the queries computed)
  bool masked = false;         // some pair of positions has different labels

  explicit WindowTokens(int64_t N) : coord(3 * N), token(N), label(N + kVec) { rows.reserve(N); }

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

// The window tokens of a thread's current task. Tasks run heads innermost, so one window serves `heads`
// consecutive tasks and is built once for them.
struct TaskWindow {
  WindowTokens tokens;
  int64_t bw = -1;  // batch * n_windows + window of `tokens`

  explicit TaskWindow(int64_t N) : tokens(N) {}

  const WindowTokens& get(const Geometry& g, const WindowAttentionShape& s, int64_t task_bw) {
    if (bw != task_bw) {
      tokens.build(g, s, task_bw / g.n_windows, task_bw % g.n_windows);
      bw = task_bw;
    }
    return tokens;
  }
};

// Software prefetch of the next window's token rows (q, k, v and, in the backward, grad_out) while the current
// window's tasks run: a window's rows are short scattered runs of tokens that the hardware prefetchers do not
// follow, and gathering them was most of a task's time in the profile. The next window's rows are spread over the
// current window's `heads` tasks, a slice per task. Measured (pyvl bench, 2 threads, 7 paired runs with and
// without, over the variants tried on the way to this one): Swin-T's 2D forward+backward geometric mean 1.69x
// against 1.56x; Video Swin neutral.
struct WindowPrefetcher {
  static constexpr int64_t kPrefetchBudget = 128 * 1024;
  WindowTokens next;
  int64_t bw = -1;
  explicit WindowPrefetcher(int64_t N) : next(N) {}

  template <typename T>
  void run(const Geometry& g, const WindowAttentionShape& s, const T* const* bases, const TokenStrides* strides,
           int nbases, int64_t task_bw, int64_t h, int64_t total_bw) {
    if (task_bw + 1 >= total_bw) return;
    if (bw != task_bw + 1) {
      next.build(g, s, (task_bw + 1) / g.n_windows, (task_bw + 1) % g.n_windows);
      bw = task_bw + 1;
    }
    const int64_t b = bw / g.n_windows, n_rows = static_cast<int64_t>(next.rows.size());
    const int64_t lo = n_rows * h / s.heads, hi = n_rows * (h + 1) / s.heads;
    const int64_t bytes = s.d * static_cast<int64_t>(sizeof(T));
    // Every head's rows while they fit in a quarter of a 512 KiB L2, else the first head's (the next task's) only:
    // more would evict the current window's rows (Video Swin's 392-token windows measured slower).
    const int64_t heads = n_rows * nbases * s.heads * bytes <= kPrefetchBudget ? s.heads : 1;
    for (int64_t r = lo; r < hi; ++r)
      for (int i = 0; i < nbases; ++i)
        for (int64_t hh = 0; hh < heads; ++hh) {
          const char* p = reinterpret_cast<const char*>(next.at(bases[i], strides[i], b, next.rows[r], hh));
          for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o);
        }
  }
};

// Per-call values shared by the tasks: the bias table per head reversed (so the bias of a query and a run of keys
// along the last window dim is a contiguous slice), tau per head, the geometry.
template <typename T>
struct Problem {
  const WindowAttentionShape& s;
  const WindowAttentionInputs<T>& in;
  Geometry g;
  int64_t N;   // tokens per window
  int64_t Nv;  // N rounded up to whole vectors: the softmax's row length (logits past N are -inf)
  int64_t Np;  // row length of N-column scratch matrices: room for whole 16-column register blocks
  int64_t dp;  // the same for d columns
  int64_t run; // window[2]: keys j0 .. j0 + run - 1 of a run have consecutive table rows
  std::vector<T> rev_table;  // [heads][rows] + kVec: rev_table[h][x] = table[rows - 1 - x][h], padded for 8-wide reads
  std::vector<T> tau;        // [heads]

  Problem(const WindowAttentionShape& s_, const WindowAttentionInputs<T>& in_) : s(s_), in(in_), g(s_) {
    N = g.N;
    Nv = round_up(N, kVec);
    Np = round_up(N, NR);
    dp = round_up(s.d, NR);
    run = s.window[2];
    const int64_t rows = g.table_rows, heads = s.heads;
    if (in.rel_bias_table) {
      rev_table.assign(heads * rows + kVec, T(0));
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

  // The table bias of query position n_i against every key, into bias[0, N) (bias has room for N + kVec).
  // table[center + A_i - A_j] = rev_table[(center - A_i) + A_j], and A_j runs over consecutive values within a
  // run of keys along the last window dim.
  void table_bias_row(int n_i, int64_t h, T* bias) const {
    const T* rb = rev_table.data() + h * g.table_rows + (g.bias_center - g.table_coord[n_i]);
    for (int64_t j0 = 0; j0 < N; j0 += run) {
      const T* src = rb + g.table_coord[j0];
#ifdef PYVL_WA_AVX2
      // One 8-wide copy per run; the next run's copy overwrites the spill (runs are written in order).
      if (std::is_same<T, float>::value && run <= kVec) {
        _mm256_storeu_ps(reinterpret_cast<float*>(bias + j0), _mm256_loadu_ps(reinterpret_cast<const float*>(src)));
        continue;
      }
#endif
      for (int64_t c = 0; c < run; ++c) bias[j0 + c] = src[c];
    }
  }

  // Row m of the (query-compacted) logits of window `w`, head h, from the raw products: cosine scale, bias, mask,
  // and -inf in [N, Nv); returns the row's max. `bias` is a scratch of N + kVec values.
  T finish_logits(T* row, const WindowTokens& w, int m, int64_t h, T* bias) const {
    const int n_i = w.rows[m];
    const T* b = nullptr;
    if (in.rel_bias_table) {
      table_bias_row(n_i, h, bias);
      b = bias;
    } else if (in.rel_bias) {
      std::copy(in.rel_bias + (h * N + n_i) * N, in.rel_bias + (h * N + n_i + 1) * N, bias);
      b = bias;
    }
    return finish_row(row, N, Nv, in.logit_scale ? tau[h] : T(1), b, w.masked ? w.label.data() : nullptr,
                      w.label[n_i], static_cast<T>(s.mask_value));
  }

  // The table gradient of query position n_i: dtable[center + A_i - A_j] += ds[j], into the task's column of the
  // reversed table (`col`, table_rows + kVec values).
  void table_grad_row(int n_i, const T* ds, T* col) const {
    T* dst = col + (g.bias_center - g.table_coord[n_i]);
    for (int64_t j0 = 0; j0 < N; j0 += run) {
      T* d = dst + g.table_coord[j0];
#ifdef PYVL_WA_AVX2
      // 8-wide: the lanes past the run add 0 (ds is readable to Np).
      if (std::is_same<T, float>::value && run <= kVec) {
        const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(run)), idx));
        float* df = reinterpret_cast<float*>(d);
        const float* sf = reinterpret_cast<const float*>(ds + j0);
        _mm256_storeu_ps(df, _mm256_add_ps(_mm256_loadu_ps(df), _mm256_and_ps(_mm256_loadu_ps(sf), keep)));
        continue;
      }
#endif
      for (int64_t c = 0; c < run; ++c) d[c] += ds[j0 + c];
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
  const T norm = std::sqrt(dot(src, src, d));
  const T denom = std::max(norm, static_cast<T>(kNormEps));
  for (int64_t c = 0; c < d; ++c) dst[c] = src[c] / denom;
  return norm;
}

// d(x / max(|x|, eps)) / dx applied to g, given xh = the normalized row and the norm of x (torch.clamp_min passes
// the gradient where norm >= eps).
template <typename T>
void normalize_backward(const T* xh, T norm, const T* g, int64_t d, T* dx) {
  if (norm >= static_cast<T>(kNormEps)) {
    const T xg = dot(xh, g, d);
    const T inv = T(1) / norm;
    for (int64_t c = 0; c < d; ++c) dx[c] = (g[c] - xh[c] * xg) * inv;
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
  const int64_t N = P.N, Nv = P.Nv, Np = P.Np, dp = P.dp, d = s.d, heads = s.heads;
  const bool cosine = in.logit_scale != nullptr;
  const T scale = static_cast<T>(s.scale);
  const int64_t tasks = P.tasks();
#pragma omp parallel
  {
    std::vector<T> Q(N * dp), KT(dp * Np), V(N * dp), S(N * Np), O(N * dp), zeros(d), krow(d), bias(N + kVec),
        mx(N), sum(N);
    TaskWindow window(N);
    WindowPrefetcher prefetcher(N);
    const T* bases[3] = {in.q, in.k, in.v};
    const TokenStrides strides[3] = {in.q_strides, in.k_strides, in.v_strides};
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t h = task % heads, bw = task / heads, b = bw / P.g.n_windows;
      const WindowTokens& w = window.get(P.g, s, bw);
      const int M = static_cast<int>(w.rows.size());
      prefetcher.run(P.g, s, bases, strides, 3, bw, h, tasks / heads);
      if (M == 0) continue;
      for (int m = 0; m < M; ++m) load_row(w.at(in.q, in.q_strides, b, w.rows[m], h), d, cosine, scale, &Q[m * dp]);
      for (int64_t n = 0; n < N; ++n) {
        load_row(key_row(P, w, b, n, h, zeros.data()), d, cosine, T(1), krow.data());
        for (int64_t c = 0; c < d; ++c) KT[c * Np + n] = krow[c];
        const T* vr = value_row(P, w, b, n, h, zeros.data());
        copy_row(vr, d, &V[n * dp]);
      }
      gemm<T>(M, N, d, Q.data(), dp, 1, KT.data(), Np, S.data(), Np);
      for (int m = 0; m < M; ++m) mx[m] = P.finish_logits(&S[m * Np], w, m, h, bias.data());
      exp_rows(S.data(), Np, M, Nv, mx.data(), sum.data());
      // O = (exp(S - max) V) / sum: the normalization is applied to the d outputs rather than the N probabilities.
      gemm<T>(M, d, N, S.data(), Np, 1, V.data(), dp, O.data(), dp);
      for (int m = 0; m < M; ++m) {
        const int64_t t = w.token[w.rows[m]] * heads + h;
        lse[t] = mx[m] + std::log(sum[m]);
        scale_row(&O[m * dp], d, T(1) / sum[m], out + t * d);
      }
    }
  }
}

template <typename T>
void window_attention_backward(const WindowAttentionShape& s, const WindowAttentionInputs<T>& in, const T* grad_out,
                               const TokenStrides& grad_out_strides, const WindowAttentionGrads<T>& grads) {
  const Problem<T> P(s, in);
  const int64_t N = P.N, Nv = P.Nv, Np = P.Np, dp = P.dp, d = s.d, heads = s.heads;
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

    std::vector<T> Q(N * dp), KT(dp * Np), K(N * dp), VT(dp * Np), dO(N * dp), S(N * Np), dS(N * Np), G(N * dp),
        dK(N * dp), dV(N * dp), mx(N), sum(N), qnorm(N), knorm(N), zeros(d), tmp(d), bias(N + kVec),
        dcol(need_table ? rows + kVec : 0);
    TaskWindow window(N);
    WindowPrefetcher prefetcher(N);
    const T* bases[4] = {in.q, in.k, in.v, grad_out};
    const TokenStrides strides[4] = {in.q_strides, in.k_strides, in.v_strides, grad_out_strides};
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t h = task % heads, bw = task / heads, b = bw / P.g.n_windows;
      const WindowTokens& w = window.get(P.g, s, bw);
      const int M = static_cast<int>(w.rows.size());
      prefetcher.run(P.g, s, bases, strides, 4, bw, h, tasks / heads);
      if (M == 0) continue;
      for (int m = 0; m < M; ++m) {
        const int n = w.rows[m];
        qnorm[m] = load_row(w.at(in.q, in.q_strides, b, n, h), d, cosine, scale, &Q[m * dp]);
        const T* go = w.at(grad_out, grad_out_strides, b, n, h);
        copy_row(go, d, &dO[m * dp]);
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
      if (need_table) std::fill(dcol.begin(), dcol.end(), T(0));
      // P = softmax(logits), recomputed as the forward computes it: exp(S - max) / sum rather than exp(S - lse),
      // since lse carries an absolute rounding error of ulp(lse), which is large beside the probabilities' own
      // error when the logits are large (cosine attention with tau = 100). dS = P * (dP - rowsum(P * dP)).
      gemm<T>(M, N, d, Q.data(), dp, 1, KT.data(), Np, S.data(), Np);
      gemm<T>(M, N, d, dO.data(), dp, 1, VT.data(), Np, dS.data(), Np);
      for (int m = 0; m < M; ++m) mx[m] = P.finish_logits(&S[m * Np], w, m, h, bias.data());
      exp_rows<T>(S.data(), Np, M, Nv, mx.data(), sum.data());
      for (int m = 0; m < M; ++m) {
        T* p = &S[m * Np];
        scale_row(p, N, T(1) / sum[m], p);
        T* ds = &dS[m * Np];
        // rowsum(P * dP) rather than the equal rowsum(dO * O): the softmax backward exactly as autograd takes it,
        // so that a row whose probabilities are all but one-hot gets the reference's (near) zero gradient.
        const T Dm = dot(p, ds, N);
        for (int64_t j = 0; j < N; ++j) ds[j] = p[j] * (ds[j] - Dm);
        if (need_table) P.table_grad_row(w.rows[m], ds, dcol.data());
        if (need_bias) {
          double* db = acc_bias + (h * N + w.rows[m]) * N;
          for (int64_t j = 0; j < N; ++j) db[j] += ds[j];
        }
      }
      if (need_table)
        for (int64_t x = 0; x < rows; ++x) acc_table[h * rows + x] += dcol[x];
      if (need_dv) {
        gemm<T>(N, d, M, S.data(), 1, Np, dO.data(), dp, dV.data(), dp);  // P^T dO
        for (int64_t n = 0; n < N; ++n) {
          const T* src = &dV[n * dp];
          if (w.token[n] >= 0) {
            if (grads.dv) copy_row(src, d, grads.dv + (w.token[n] * heads + h) * d);
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
            copy_row(tmp.data(), d, g);
          }
          if (w.token[n] >= 0) {
            if (grads.dk) copy_row(g, d, grads.dk + (w.token[n] * heads + h) * d);
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
              acc_tau[h] += dot(qh, g, d);
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
                                               const float*, const TokenStrides&, const WindowAttentionGrads<float>&);
template void window_attention_backward<double>(const WindowAttentionShape&, const WindowAttentionInputs<double>&,
                                                const double*, const TokenStrides&,
                                                const WindowAttentionGrads<double>&);

}  // namespace cpu
}  // namespace pyvl
